"""BriVL reranking throughput, full-size architecture with random weights (no checkpoint needed).

Ours: ``BriVL.score(text, images)`` as ``load_brivl`` returns it — the text encoded once; the CNN with its BatchNorms
folded into the convs, channels-last, a few images at a time on CPU; RoI pooling and the transformer on the whole
batch, only the valid RoI slot computed.
Baseline (same run): the original's way (GEN ``clip_sort.py`` / ``XYB_box_extract.py``) — batch 1, the whole paired
model per image (text re-encoded for every image), all 37 RoI slots through the per-image RoI loop and the
transformers, NCHW convolutions, with the unused ``*_mom`` copies held in memory. Same preprocessing (IMG_SIZE 380)
and weights; the scores of both are compared. Each side runs in its own process so that its peak RSS is its own;
the sides alternate for ``--rounds`` rounds and each keeps its best (the machine may be shared).

    python bench/bench_brivl.py                        # CPU, 32 images of 256x256, batch 32
    python bench/bench_brivl.py --images 16 --json bench/brivl.json
    python bench/bench_brivl.py --device cuda --precisions fp32 fp16 bf16   # GPU: images/s + max |diff| vs fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brivl_infer.encoder import BriVL
from brivl_infer.load import KNOWN_ENCODERS, build_model
from brivl_infer.model import BriVLConfig
from brivl_infer.preprocess import prepare_image, prepare_texts
from form_data.tokenizer import build_vocab, cn_clip_vocab, load_tokenizer

TEXT = "一碗红烧牛肉面，汤汁浓郁，上面撒着葱花和香菜"


def make_model(seed: int = 0, precision: str = "fp32") -> BriVL:
    torch.manual_seed(seed)
    cfg = BriVLConfig(bert=dict(KNOWN_ENCODERS[BriVLConfig.encoder]))
    if cn_clip_vocab() is not None:
        tok = load_tokenizer()
    else:  # no cn_clip: a vocab of the prompt's characters is enough to time the model
        tok = build_vocab([TEXT], Path(tempfile.mkdtemp()) / "vocab.txt")
    return build_model(cfg, tok, precision)


def make_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random images like generated samples (DALLE outputs are 256x256)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((size, size), Image.BILINEAR))
    return out


def original_pair(model: BriVL, x: torch.Tensor, boxes: torch.Tensor, img_mask: torch.Tensor, ids: torch.Tensor,
                  text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original ``extract`` on one pair: every RoI slot computed, per-image RoI loop over expanded copies."""
    enc, cfg = model.imgencoder, model.config
    fmap = enc.backbone.forward_features(x)
    h, w = fmap.shape[2:]
    n = boxes.shape[1]
    x1, y1, x2, y2 = (boxes[0] / (cfg.img_size / h)).unbind(-1)
    zero = torch.zeros_like(x1)
    theta = torch.stack([(x2 - x1) / (w - 1), zero, (x1 + x2 - w + 1) / (w - 1),
                         zero, (y2 - y1) / (h - 1), (y1 + y2 - h + 1) / (h - 1)], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta, [n, fmap.shape[1], cfg.grid_size, cfg.grid_size], align_corners=False)
    s = F.grid_sample(fmap.expand(n, -1, -1, -1), grid, align_corners=False)
    v = F.normalize(enc.learnable["max_pool"](s).flatten(1)[None], dim=-1)
    v = enc.learnable["imgAtt"](v.transpose(0, 1), src_key_padding_mask=img_mask == 0).transpose(0, 1)
    v = enc.learnable["imgFC"]((v * img_mask[..., None]).sum(1) / img_mask.sum(1, keepdim=True))
    tenc = model.textencoder
    t = F.normalize(tenc.backbone(ids), dim=-1)
    t = tenc.learnable["textAtt"](t.transpose(0, 1), src_key_padding_mask=text_mask == 0).transpose(0, 1)
    t = tenc.learnable["textFC"]((t * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True))
    return F.normalize(v, dim=-1), F.normalize(t, dim=-1)


def run_side(side: str, n: int, size: int, batch: int, out: Path) -> None:
    """One side in this process: images/s, scores and peak RSS to ``out``."""
    model = make_model()
    images = make_images(n, size)
    if side.startswith("ours"):
        model.fold_batchnorm()  # as load_brivl does after loading the weights
        model.precision = side.partition("-")[2] or "fp32"
        model.score(TEXT, images[:2], batch_size=2)  # warm-up
        t0 = time.perf_counter()
        scores = model.score(TEXT, images, batch_size=batch)
        seconds = time.perf_counter() - t0
        # the CNN alone, one image at a time: what the rest of the model, the text and the preprocessing add to it
        x, _, _ = prepare_image(images[0], None, model.config)
        x = x[None].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), model._autocast():
            t0 = time.perf_counter()
            for _ in range(n // 4):
                model.imgencoder.backbone.forward_features(x)
            cnn_s = (time.perf_counter() - t0) / (n // 4)
    else:
        mom = make_model(seed=1)  # the original builds imgencoder_mom / textencoder_mom too and never uses them
        model.imgencoder.backbone.to(memory_format=torch.contiguous_format)  # the original runs NCHW
        with torch.inference_mode():
            def one(img):
                x, b, m = (t[None] for t in prepare_image(img, None, model.config))
                ids, tm = prepare_texts(model.tokenizer, [TEXT], model.config.max_text_len)
                v, t = original_pair(model, x, b, m, ids, tm)
                return float(v[0] @ t[0])

            one(images[0])  # warm-up
            t0 = time.perf_counter()
            scores = np.array([one(img) for img in images], dtype=np.float32)
            seconds = time.perf_counter() - t0
        del mom
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = {"cnn_alone_images_per_s": 1 / cnn_s} if side.startswith("ours") else {}
    out.write_text(json.dumps({"images_per_s": n / seconds, "seconds": seconds, "peak_rss_mb": rss_mb,
                               "scores": scores.tolist(), **extra}))


def gpu_precisions(precisions: list[str], n: int, size: int, batch: int, device: str) -> dict:
    """images/s at ``batch`` per precision and the max |embedding difference| vs fp32 (images and text)."""
    model = make_model().to(device)
    images = make_images(n, size)
    ref_img = ref_text = None
    rows = {}
    for p in precisions:
        model.precision = p
        model.encode_images(images[:batch], batch_size=batch)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        img = model.encode_images(images, batch_size=batch)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        text = model.encode_texts([TEXT])
        if ref_img is None:
            ref_img, ref_text = img, text
        rows[p] = {"images_per_s": n / seconds, "max_abs_diff_image_vs_fp32": float((img - ref_img).abs().max()),
                   "max_abs_diff_text_vs_fp32": float((text - ref_text).abs().max()),
                   "peak_gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32, help="images to rerank (one text)")
    ap.add_argument("--size", type=int, default=256, help="side of the generated test images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu: ours vs baseline; cuda: --precisions")
    ap.add_argument("--precisions", nargs="+", default=None,
                    help="cuda: fp32 fp16 bf16 (default); cpu: our side's precisions, fp32 bf16 (default)")
    ap.add_argument("--rounds", type=int, default=2, help="CPU: alternating runs of both sides; the best counts")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--side", choices=["ours", "ours-bf16", "ours-fp16", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    a.precisions = a.precisions or (["fp32", "fp16", "bf16"] if cuda else ["fp32", "bf16"])
    if a.side:
        run_side(a.side, a.images, a.size, a.batch_size, Path(a.out))
        return
    info = {"benchmark": "brivl_rerank", "images": a.images, "rounds": a.rounds, "image_size": a.size,
            "batch_size": a.batch_size, "threads": torch.get_num_threads(), "machine": platform.platform(),
            "torch": torch.__version__}
    if cuda:
        rows = gpu_precisions(a.precisions, a.images, a.size, a.batch_size, a.device)
        info.update(device=torch.cuda.get_device_name(), results=rows)
        print(f"{'precision':<10}{'img/s':>9}{'max|d| img':>12}{'max|d| text':>13}{'GPU MB':>9}")
        for p, r in rows.items():
            print(f"{p:<10}{r['images_per_s']:>9.1f}{r['max_abs_diff_image_vs_fp32']:>12.2e}"
                  f"{r['max_abs_diff_text_vs_fp32']:>13.2e}{r['peak_gpu_mem_mb']:>9.0f}")
    else:
        sides: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(a.rounds):  # alternate the sides; keep each side's best round (a shared machine is noisy)
                for side in ["baseline"] + [f"ours-{p}" if p != "fp32" else "ours" for p in a.precisions]:
                    out = Path(tmp) / f"{side}.json"
                    subprocess.run([sys.executable, __file__, "--side", side, "--images", str(a.images), "--size",
                                    str(a.size), "--batch-size", str(a.batch_size), "--out", str(out)], check=True)
                    r = json.loads(out.read_text())
                    best = sides.setdefault(side, r)
                    if "cnn_alone_images_per_s" in r:
                        best["cnn_alone_images_per_s"] = max(best["cnn_alone_images_per_s"],
                                                             r["cnn_alone_images_per_s"])
                    best.update(images_per_s=max(best["images_per_s"], r["images_per_s"]),
                                seconds=min(best["seconds"], r["seconds"]),
                                peak_rss_mb=max(best["peak_rss_mb"], r["peak_rss_mb"]))
        base = np.array(sides["baseline"].pop("scores"))
        for name, r in sides.items():
            if name != "baseline":
                r["max_abs_score_diff"] = float(np.abs(np.array(r.pop("scores")) - base).max())
                r["speedup"] = r["images_per_s"] / sides["baseline"]["images_per_s"]
                r["bound_cnn_alone"] = r["cnn_alone_images_per_s"] / sides["baseline"]["images_per_s"]
        info.update(device="cpu", results=sides)
        if "ours" in sides:
            info.update(speedup=sides["ours"]["speedup"], max_abs_score_diff=sides["ours"]["max_abs_score_diff"])
        print(f"{'':<38}{'img/s':>8}{'peak RSS MB':>13}{'speed-up':>10}{'max|score diff|':>17}")
        for name, r in sides.items():
            label = ("original way (batch 1, whole model)" if name == "baseline" else
                     f"ours (batch {a.batch_size}, {name.partition('-')[2] or 'fp32'})")
            extra = "" if name == "baseline" else f"{r['speedup']:>9.2f}x{r['max_abs_score_diff']:>17.1e}"
            print(f"{label:<38}{r['images_per_s']:>8.2f}{r['peak_rss_mb']:>13.0f}{extra}")
        for name, r in sides.items():
            if name != "baseline":
                print(f"{name}: its CNN alone (batch 1) runs {r['cnn_alone_images_per_s']:.2f} images/s, so no "
                      f"reranker built on it can beat {r['bound_cnn_alone']:.2f}x the original way on this machine")
    if a.json:
        Path(a.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
