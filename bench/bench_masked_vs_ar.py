"""The masked generator (MaskGIT-style parallel decoding) against the autoregressive DALLE over the SAME image tokens,
the same model size, data, training steps, prompts, seeds, guidance and top-k, judged by the same colour/shape judge,
reranked by the same CLIP, and timed in the same process.

It needs a finished ``make demo`` run: its tokens, vocab, judge, CLIP and DALLE (the AR baseline, with its config and
its generated prompt folders). Through the user commands it trains ``python -m dalle_train --kind masked`` with the AR
run's flags (fixed steps, never a time), generates every demo prompt with ``dalle_gen.py`` and reranks it with
``clip_sort.py``. With ``--svq-work`` (the work directory of ``bench/bench_styled_vq_dalle.py``: Styled-VQ tokens and
an AR DALLE over them) it does the same over Styled-VQ's 36 ordered tokens.

Figures per generator: S2 adherence (colour / shape / both, seen and unseen combinations), S3 rerank gain (points of
"both" gained by keeping the CLIP top-k of each group), the judge-space Frechet distance to the real val images
(``python -m zh_t2i_eval``), and images/s at N = 64 with guidance (best of ``--rounds``, model loaded and warm).

    python bench/bench_masked_vs_ar.py --demo runs/demo --work runs/masked_vs_ar --json out.json
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

from bench_styled_vq_dalle import flags, sh  # noqa: E402 - its sibling script: the same way of running the commands

from dalle_train.generate import generate, load_dalle  # noqa: E402 - run as a script from the repo root
from form_data.synth import parse_caption, parse_holdout  # noqa: E402
from zh_t2i_demo.judge import Judge, score_dir  # noqa: E402
from zh_t2i_demo.report import rerank_gain  # noqa: E402

DALLE_FLAGS = ("dim", "depth", "heads", "dim_head", "ff_mult", "loss_img_weight", "null_cond_prob", "text_seq_len")
RUNTIME_FLAGS = ("batch_size", "lr", "warmup_steps", "max_steps", "grad_clip", "seed", "weight_decay", "beta2",
                 "schedule")
FIGURES = [f"{g}/{w}" for g in ("seen", "unseen") for w in ("colour", "shape", "both")]


def quality(judge: Judge, gen: Path, held: set, top_k: int, group: int) -> dict:
    """S2 adherence per seen/unseen group and the S3 rerank gain, over every prompt folder of ``gen``."""
    rows: dict[str, list] = {"seen": [], "unseen": []}
    gains = []
    for folder in sorted(p for p in gen.iterdir() if (p / "meta.json").is_file()):
        v = score_dir(judge, folder)
        want = parse_caption(v["prompt"])
        rows["unseen" if (want["colour"], want["shape"]) in held else "seen"].append(v)
        ranking = json.loads((folder / "ranking.json").read_text(encoding="utf-8"))["ranking"]
        score = {r["file"]: float(r["score"]) for r in ranking}
        files = [r["file"] for r in v["images"]]
        gains += rerank_gain([r["both"] for r in v["images"]], [score.get(f, float("-inf")) for f in files],
                             top_k, group)
    out = {f"{g}/{w}": float(np.mean([v[w] for v in rs])) if rs else float("nan")
           for g, rs in rows.items() for w in ("colour", "shape", "both")}
    out["S3_gain_points"] = float(np.mean(gains)) if gains else float("nan")
    return out


def speed(ckpt: Path, prompt: str, n: int, settings: dict, rounds: int, batch_size: int) -> float:
    """Images/s generating ``n`` images ``batch_size`` at a time (best of ``rounds``; loaded and warmed up)."""
    bundle = load_dalle(ckpt, "cpu")
    extra = {"steps": settings["steps"]} if settings.get("steps") else {}
    kw = {"cond_scale": settings["cond_scale"], "top_k": settings.get("top_k"), "batch_size": batch_size, **extra}
    generate(bundle, prompt, min(n, 8), seed=0, **kw)  # warm-up
    best = 0.0
    for r in range(rounds):
        t0 = time.perf_counter()
        generate(bundle, prompt, n, seed=r, **kw)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def compare(name: str, tokens: Path, ar_run: Path, ar_gen: Path | None, demo: Path, work: Path, a) -> dict:
    """Train the masked model like ``ar_run``, generate (``ar_gen``: the AR images already made with the demo's
    settings) and rerank the demo prompts with both, measure both."""
    ar_cfg = json.loads((ar_run / "config.json").read_text(encoding="utf-8"))
    ar_steps = int(ar_cfg["runtime"]["max_steps"])
    runs = {"ar": ar_run, "masked": work / name / "masked"}
    if a.masked_more:  # the same model trained longer: how far the masked model is from converged at equal steps
        runs[f"masked_x{a.masked_more}"] = work / name / f"masked_x{a.masked_more}"
    for kind, masked in runs.items():
        if kind == "ar" or list(masked.glob("ckpt-*.pt")):
            continue
        steps = ar_steps * (a.masked_more if kind != "masked" else 1)
        t0 = time.perf_counter()
        sh("-m", "dalle_train", "--kind", "masked", "--train-data", str(tokens / "train.pt"), "--val-data",
           str(tokens / "val.pt"), "--vocab", str(demo / "vocab.txt"), *flags(ar_cfg["dalle"], DALLE_FLAGS),
           *flags(ar_cfg["runtime"], RUNTIME_FLAGS), "--max-steps", str(steps), "--sample-steps", str(a.steps),
           "--workers", "0", "--log-every", "50", "--eval-every", "100000", "--sample-images", "0",
           "--out-dir", str(masked))
        print(f"{kind} training: {time.perf_counter() - t0:.1f} s", flush=True)
    prompts = [json.loads((f / "meta.json").read_text(encoding="utf-8"))
               for f in sorted(p for p in (demo / "gen").iterdir() if (p / "meta.json").is_file())]
    gens = {kind: (ar_gen or work / name / "gen_ar") if kind == "ar" else work / name / f"gen_{kind}"
            for kind in runs}
    for i, meta in enumerate(prompts):
        st = meta["settings"]
        same = ["--cond-scale", str(st["cond_scale"]), "--top-k", str(st["top_k"]), "--seed", str(st["seed"]),
                "--quiet"]
        for kind, run in runs.items():
            extra = [] if kind == "ar" else ["--steps", str(a.steps)]
            out = gens[kind] / f"p{i}"
            if not (out / "meta.json").is_file():
                sh("dalle_gen.py", meta["prompt"], str(meta["n"]), str(out), "--checkpoint", str(run), *same, *extra)
        for gen in gens.values():
            folder = gen / f"p{i}"
            if not (folder / "ranking.json").is_file():
                sh("clip_sort.py", meta["prompt"], str(meta["n"]), str(folder), "--scorer", f"clip:{demo / 'clip'}",
                   "--top-k", str(a.top_k), stdout=subprocess.DEVNULL)
    held = set(parse_holdout("default"))
    judge = Judge.load(demo / "judge")
    rows = {}
    for kind, run in runs.items():
        fd_json = work / name / f"eval_{kind}.json"
        if not fd_json.is_file():
            sh("-m", "zh_t2i_eval", str(gens[kind]), "--real", str(demo / "data" / "val_clip.csv"), "--judge",
               str(demo / "judge"), "--no-fid", "--out", str(fd_json), stdout=subprocess.DEVNULL)
        fd = json.loads(fd_json.read_text(encoding="utf-8"))
        settings = {**prompts[0]["settings"], "steps": None if kind == "ar" else a.steps}
        bundle = load_dalle(run, "cpu")
        rows[kind] = {"image_tokens": bundle.model.cfg.image_seq_len, "codes": bundle.model.cfg.num_image_tokens,
                      "parameters": sum(p.numel() for p in bundle.model.parameters()),
                      "train_steps": json.loads((run / "result.json").read_text(encoding="utf-8"))["step"],
                      "decode_passes": bundle.model.cfg.image_seq_len if kind == "ar" else a.steps,
                      "judge_frechet": _frechet(fd),
                      "images_per_s": speed(run, prompts[0]["prompt"], a.speed_n, settings, a.rounds, a.speed_n),
                      "images_per_s_batch1": speed(run, prompts[0]["prompt"], 8, settings, a.rounds, 1),
                      **quality(judge, gens[kind], held, a.top_k, a.group)}
    rows["speedup_masked_vs_ar"] = rows["masked"]["images_per_s"] / rows["ar"]["images_per_s"]
    rows["speedup_masked_vs_ar_batch1"] = rows["masked"]["images_per_s_batch1"] / rows["ar"]["images_per_s_batch1"]
    rows["both_points_masked_minus_ar"] = {g: 100 * (rows["masked"][f"{g}/both"] - rows["ar"][f"{g}/both"])
                                           for g in ("seen", "unseen")}
    return rows


def _frechet(doc: dict) -> float:
    """The judge-space Frechet distance of a ``python -m zh_t2i_eval`` result."""
    return float(doc.get("metrics", {}).get("judge_fd", float("nan")))


def table(name: str, rows: dict) -> str:
    keys = ["image_tokens", "codes", "parameters", "train_steps", "decode_passes", "images_per_s",
            "images_per_s_batch1", *FIGURES, "S3_gain_points", "judge_frechet"]
    kinds = [k for k in rows if isinstance(rows[k], dict) and "images_per_s" in rows[k]]
    lines = [f"| {name} | " + " | ".join("AR DALLE (KV cache)" if k == "ar" else k for k in kinds) + " |",
             "|---" * (len(kinds) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{rows[kind][k]:.4g}" for kind in kinds) + " |")
    lines.append(f"| images/s ratio masked / AR, N = 64 at once | {rows['speedup_masked_vs_ar']:.2f}x |")
    lines.append(f"| images/s ratio masked / AR, one at a time | {rows['speedup_masked_vs_ar_batch1']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="runs/demo", help="a finished `make demo` run directory")
    p.add_argument("--work", default="runs/masked_vs_ar")
    p.add_argument("--svq-work", help="also over Styled-VQ tokens: bench/bench_styled_vq_dalle.py's --work")
    p.add_argument("--steps", type=int, default=12, help="masked decoding passes")
    p.add_argument("--top-k", type=int, default=4, help="reranked images kept per group (the demo's)")
    p.add_argument("--group", type=int, default=32, help="samples per rerank group (the demo's)")
    p.add_argument("--masked-more", type=int, default=4,
                   help="also train the masked model for this many times the AR steps (0: off)")
    p.add_argument("--speed-n", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    demo, work = (REPO / a.demo).resolve(), (REPO / a.work).resolve()
    need = [demo / "tokens" / "train.pt", demo / "vocab.txt", demo / "judge", demo / "clip", demo / "dalle",
            demo / "gen"]
    missing = [str(x) for x in need if not x.exists()]
    if missing:
        sys.exit(f"run `make demo` first: missing {', '.join(missing)}")
    work.mkdir(parents=True, exist_ok=True)
    result = {"grid": compare("grid", demo / "tokens", demo / "dalle", demo / "gen", demo, work, a)}
    if a.svq_work:
        svq = (REPO / a.svq_work).resolve()
        result["styled_vq"] = compare("styled_vq", svq / "tokens", svq / "dalle", None, demo, work, a)
    result["threads"] = torch.get_num_threads()
    print()
    for name in ("grid", "styled_vq"):
        if name in result:
            print(table(name, result[name]), "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
