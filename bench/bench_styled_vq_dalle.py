"""DALLE over Styled-VQ's 36 ordered tokens vs the demo's grid pipeline (8x8 = 64 dVAE tokens), same data, same
DALLE size and budget, same prompts, seeds and guidance, judged by the same colour/shape judge.

It needs a finished ``make demo`` run (its data, vocab, judge, DALLE config and generated prompt folders are the
baseline) and trains, through the user commands, a Styled-VQ tokenizer for as many steps as the demo's dVAE (fixed
work, never a time) -> dump -> k-means (the dVAE's codebook size) -> attach -> tokenize -> DALLE with the demo's
flags -> ``dalle_gen.py`` per prompt. Then it times generation of both DALLE models in this process (same N, batch,
guidance).

    python bench/bench_styled_vq_dalle.py --demo runs/demo --work runs/demo_svq --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dalle_train.generate import generate, load_dalle  # noqa: E402 - run as a script from the repo root
from form_data.synth import parse_caption, parse_holdout  # noqa: E402
from zh_t2i_demo.judge import Judge, score_dir  # noqa: E402

DALLE_FLAGS = ("dim", "depth", "heads", "dim_head", "ff_mult", "loss_img_weight", "null_cond_prob")
RUNTIME_FLAGS = ("batch_size", "lr", "warmup_steps", "max_steps", "max_time", "grad_clip", "seed")


def sh(*args: str, stdout=None) -> None:
    cmd = [sys.executable, *args]
    print("+ python", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=stdout)


def flags(section: dict, names) -> list[str]:
    out = []
    for n in names:
        if section.get(n) is not None:
            out += [f"--{n.replace('_', '-')}", str(section[n])]
    return out


def adherence(judge: Judge, gen: Path, held: set) -> dict:
    rows = {"seen": [], "unseen": []}
    for folder in sorted(p for p in gen.iterdir() if (p / "meta.json").is_file()):
        v = score_dir(judge, folder)
        want = parse_caption(v["prompt"])
        rows["unseen" if (want["colour"], want["shape"]) in held else "seen"].append(v)
    return {f"{g}/{w}": float(np.mean([v[w] for v in rs])) if rs else float("nan")
            for g, rs in rows.items() for w in ("colour", "shape", "both")}


def gen_speed(ckpt: Path, prompt: str, n: int, cond_scale: float, rounds: int) -> float:
    bundle = load_dalle(ckpt, "cpu")
    generate(bundle, prompt, min(n, 8), cond_scale=cond_scale, seed=0)  # warm-up
    best = 0.0
    for r in range(rounds):
        t0 = time.perf_counter()
        generate(bundle, prompt, n, cond_scale=cond_scale, seed=r)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="runs/demo", help="a finished `make demo` run directory")
    p.add_argument("--work", default="runs/demo_svq")
    p.add_argument("--preset", default="tiny36-64px")
    p.add_argument("--svq-steps", type=int, default=0, help="stage-1 steps (default: the demo dVAE's --max-steps)")
    p.add_argument("--svq-lr", type=float, default=2e-3)
    p.add_argument("--svq-batch-size", type=int, default=16)
    p.add_argument("--speed-n", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    demo, work = (REPO / a.demo).resolve(), (REPO / a.work).resolve()
    need = [demo / "data" / "train_clip.csv", demo / "vocab.txt", demo / "judge", demo / "dalle" / "config.json",
            demo / "gen", demo / "vae_eval.json"]
    missing = [str(x) for x in need if not x.exists()]
    if missing:
        sys.exit(f"run `make demo` first: missing {', '.join(missing)}")
    work.mkdir(parents=True, exist_ok=True)
    data = demo / "data"
    vae_cfg = json.loads((demo / "vae" / "config.json").read_text())
    dalle_cfg = json.loads((demo / "dalle" / "config.json").read_text())
    vae_model = vae_cfg.get("model", vae_cfg.get("vae", {}))
    k = int(vae_model.get("num_tokens", 512))
    svq_steps = a.svq_steps or int(vae_cfg["runtime"]["max_steps"])  # fixed work, as the demo: never a time
    timings = {}

    def timed(name, *args):
        t0 = time.perf_counter()
        sh(*args)
        timings[name] = time.perf_counter() - t0

    if not (work / "s2" / "model.safetensors").is_file():
        timed("stage1", "-m", "styled_vq", "--stage", "1", "--preset", a.preset, "--train-data",
              str(data / "train_clip.csv"), "--val-data", str(data / "val_clip.csv"), "--batch-size",
              str(a.svq_batch_size), "--lr", str(a.svq_lr), "--warmup-steps", "50", "--schedule", "constant",
              "--max-steps", str(svq_steps), "--workers", "0", "--log-every", "20",
              "--out-dir", str(work / "s1"))
        timed("dump", "-m", "styled_vq", "dump", "--model", str(work / "s1"), "--data", str(data / "train_clip.csv"),
              "--out", str(work / "feats"), "--workers", "0")
        timed("kmeans", "-m", "styled_vq", "kmeans", "--features", str(work / "feats"), "--k", str(k), "--out",
              str(work / "codebook.pt"))
        sh("-m", "styled_vq", "attach", "--model", str(work / "s1"), "--codebook", str(work / "codebook.pt"), "--out",
           str(work / "s2"))
    sh("-m", "vae_train", "eval", "--tokenizer", str(work / "s2"), "--data", str(data / "val_clip.csv"),
       "--max-images", "1000", "--out", str(work / "svq_eval.json"))
    if not (work / "tokens" / "val.pt").is_file():
        for split in ("train", "val"):
            sh("-m", "vae_train", "tokenize", "--tokenizer", str(work / "s2"), "--data",
               str(data / f"{split}_clip.csv"), "--out", str(work / "tokens" / f"{split}.pt"), "--workers", "0")
    if not list((work / "dalle").glob("ckpt-*.pt")):
        timed("dalle", "-m", "dalle_train", "--train-data", str(work / "tokens" / "train.pt"), "--val-data",
              str(work / "tokens" / "val.pt"), "--vocab", str(demo / "vocab.txt"),
              *flags(dalle_cfg["dalle"], DALLE_FLAGS), *flags(dalle_cfg["runtime"], RUNTIME_FLAGS), "--workers", "0",
              "--log-every", "20", "--eval-every", "200", "--sample-images", "0", "--out-dir", str(work / "dalle"))
    prompts = []
    for folder in sorted(p for p in (demo / "gen").iterdir() if (p / "meta.json").is_file()):
        meta = json.loads((folder / "meta.json").read_text())
        prompts.append(meta)
        out = work / "gen" / folder.name
        if not (out / "meta.json").is_file():
            st = meta["settings"]
            sh("dalle_gen.py", meta["prompt"], str(meta["n"]), str(out), "--checkpoint", str(work / "dalle"),
               "--cond-scale", str(st["cond_scale"]), "--seed", str(st["seed"]), "--quiet")

    held = set(parse_holdout("default"))
    judge = Judge.load(demo / "judge")
    cond = float(prompts[0]["settings"]["cond_scale"])
    rows = {}
    for name, run, ev, gen in (("grid", demo, demo / "vae_eval.json", demo / "gen"),
                               ("styled_vq", work, work / "svq_eval.json", work / "gen")):
        ev = json.loads(ev.read_text())
        dalle_metrics = [json.loads(x) for x in (run / "dalle" / "metrics.jsonl").read_text().splitlines() if x]
        val = [{k: v for k, v in m.items() if k.startswith("eval/")} for m in dalle_metrics
               if any(k.startswith("eval/") for k in m)]
        bundle = load_dalle(run / "dalle", "cpu")
        rows[name] = {"image_tokens": bundle.model.cfg.image_seq_len, "codes": bundle.model.cfg.num_image_tokens,
                      "psnr": float(ev["psnr"]), "codebook_usage": float(ev["used_fraction"]),
                      "dalle_steps": max((m.get("step", 0) for m in dalle_metrics), default=0),
                      "dalle_val": val[-1] if val else {},
                      "gen_images_per_s": gen_speed(run / "dalle", prompts[0]["prompt"], a.speed_n, cond, a.rounds),
                      **adherence(judge, gen, held)}
    result = {"grid": rows["grid"], "styled_vq": rows["styled_vq"], "timings_s": timings,
              "gen_speed_ratio_styled_vq_vs_grid":
                  rows["styled_vq"]["gen_images_per_s"] / rows["grid"]["gen_images_per_s"],
              "threads": torch.get_num_threads()}
    print()
    keys = ["image_tokens", "codes", "psnr", "codebook_usage", "dalle_steps", "gen_images_per_s",
            *[f"{g}/{w}" for g in ("seen", "unseen") for w in ("colour", "shape", "both")]]
    print(f"| figure | grid (dVAE 8x8) | Styled-VQ ({rows['styled_vq']['image_tokens']} tokens) |")
    print("|---|---|---|")
    for key in keys:
        g, s = rows["grid"][key], rows["styled_vq"][key]
        print(f"| {key} | {g:.4g} | {s:.4g} |")
    print(f"generation speed ratio (Styled-VQ / grid): {result['gen_speed_ratio_styled_vq_vs_grid']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
