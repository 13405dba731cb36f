"""Rerank throughput: the batched scorer (text encoded once, images in batches; on CPU the image tower's BatchNorms
folded into its convs, channels-last, micro-batches) against the seed's way (the model as loaded, one image per call,
the text encoded again for every image), same weights, same images, same run. Prints images/s of both and the ratio
(target >= 4x), in fp32 and, with ``--precisions fp32 bf16``, under bf16 autocast too; ``--json OUT`` writes the
figures. For a ``--scorer`` spec other than ``clip:`` the seed's way is that scorer at batch 1.

By default the models are random-weight CLIPs of each ``--models`` architecture (zh-tiny: the demo's, 64 px; RN50:
the seed's, 224 px) saved the way ``python -m clip_train`` saves them; ``--scorer SPEC`` benchmarks any scorer instead
(``clip:RUN``, ``cnclip:ARCH:WEIGHTS``, ``brivl:CFG:CKPT``).

    python bench/bench_rerank.py                          # zh-tiny and RN50, 32 images of 256 px each
    python bench/bench_rerank.py --models ViT-B-16 --json rerank.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zh_t2i_base.cli import ArgumentParser, positive_int, run
from zh_t2i_base.fileio import write_json
from zh_t2i_base.precision import PRECISIONS
from zh_t2i_rerank.registry import make_scorer

TEXT = "一碗红烧牛肉面"


def random_clip_checkpoint(model: str, out_dir: Path) -> Path:
    """A random-weight CLIP of ``model`` written as ``python -m clip_train`` writes ``model.safetensors``."""
    import torch

    from clip_train.train import ClipConfig, build
    from train_runtime.checkpoint import export_safetensors

    torch.manual_seed(0)
    net, _, meta = build(ClipConfig(model=model))
    return export_safetensors(net.state_dict(), out_dir / "model.safetensors", {"step": 0, "meta": json.dumps(meta)})


def timed(fn, rounds: int) -> float:
    """Median seconds of ``rounds`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def seed_way_clip(path: str, device: str):
    """The seed's per-image loop over the CLIP as ``load_clip`` returns it (NCHW, BatchNorms, fp32): for each image,
    preprocess, encode the text again, encode the image, one cosine."""
    import torch

    from clip_train.load import load_clip
    from clip_train.model import normalize
    from form_data.datasets import default_transform

    clip = load_clip(path, device)
    model, prep = clip.model, default_transform(clip.image_size)

    @torch.no_grad()
    def score_one(text: str, img: Image.Image) -> float:
        t = torch.nn.functional.normalize(model.encode_text(clip.tokenizer.encode([text], clip.context_length)
                                                            .to(device)), dim=-1)
        v = torch.nn.functional.normalize(model.encode_image(normalize(model, prep(img)[None].to(device))), dim=-1)
        return float(v[0] @ t[0])

    return score_one


def measure(spec: str, images: list[Image.Image], batch_size: int, rounds: int, device: str,
            precisions: list[str]) -> dict:
    if spec.startswith("clip:"):
        one = seed_way_clip(spec.removeprefix("clip:"), device)
        def seed_way():
            return np.array([one(TEXT, img) for img in images])
    else:
        single = make_scorer(spec, device=device, batch_size=1)
        def seed_way():
            return np.concatenate([single.score(TEXT, [img]) for img in images])
    slow = seed_way()
    t_seed = timed(seed_way, rounds)
    out = {"seed_way_images_per_s": len(images) / t_seed}
    for p in precisions:
        batched = make_scorer(spec, device=device, batch_size=batch_size, precision=p)
        fast = batched.score(TEXT, images)
        t = timed(lambda s=batched: s.score(TEXT, images), rounds)
        key = "" if p == "fp32" else f"{p}_"
        out.update({f"{key}batched_images_per_s": len(images) / t, f"{key}ratio": t_seed / t,
                    f"{key}max_score_diff": float(np.abs(fast - slow).max())})
    return out


def main(argv=None) -> int:
    p = ArgumentParser(prog="bench/bench_rerank.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--scorer", default="", help="a clip_sort.py --scorer spec; default: random CLIPs of --models")
    p.add_argument("--models", nargs="+", default=["zh-tiny", "RN50"], help="architectures of the random CLIPs")
    p.add_argument("--images", type=positive_int, default=32, help="images per rerank")
    p.add_argument("--size", type=positive_int, default=256, help="side of the generated images (px)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS),
                   help="precisions of the batched scorer (fp32 first: the exact one)")
    p.add_argument("--json", default="", help="write the figures to this JSON file")
    a = p.parse_args(argv)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (a.size, a.size, 3), dtype=np.uint8)) for _ in range(a.images)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        specs = {a.scorer: a.scorer} if a.scorer else {
            m: f"clip:{random_clip_checkpoint(m, Path(tmp) / m)}" for m in a.models}
        for name, spec in specs.items():
            results[name] = measure(spec, images, a.batch_size, a.rounds, a.device, a.precisions)
            r = results[name]
            print(f"{name}: {a.images} images of {a.size} px on {a.device}")
            print(f"  seed's way (batch 1, text re-encoded per image, fp32): "
                  f"{r['seed_way_images_per_s']:8.1f} images/s")
            for p in a.precisions:
                k = "" if p == "fp32" else f"{p}_"
                print(f"  batched scorer (text once, batch {a.batch_size}, {p}):"
                      f"{r[f'{k}batched_images_per_s']:>{max(1, 20 - len(str(a.batch_size)) - len(p))}.1f} images/s"
                      f"   {r[f'{k}ratio']:.2f}x (target >= 4x); scores within {r[f'{k}max_score_diff']:.1e}")
    if a.json:
        write_json(a.json, {"images": a.images, "image_px": a.size, "batch_size": a.batch_size, "device": a.device,
                            **results})
    return 0


if __name__ == "__main__":
    run(main, prog="bench/bench_rerank.py")
