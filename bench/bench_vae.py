"""Image tokenizers on the embedded synthetic set (64 px, 8x downsampling -> 8x8 tokens), a fixed CPU time budget each:
held-out PSNR / SSIM, codebook usage and training images/s.

Baseline (same run): the DALL-E dVAE with its Gumbel-softmax relaxation, as DALLE-pytorch trains it. Compared: the same
conv stack with a straight-through nearest-code quantizer (``--quantizer vq``), in fp32 and as the demo trains it
(bf16 autocast where the CPU runs bf16 natively: ``cpu_training_precision()``), and a small taming-architecture VQGAN
trained without the GAN term. Target for the demo's tokenizer: >= 28 dB.

    python bench/bench_vae.py                    # 180 s each (about 10 minutes in all)
    python bench/bench_vae.py --seconds 60 --json bench/vae.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from form_data import synth
from train_runtime import RuntimeConfig
from vae_train.train import VAEConfig, train
from zh_t2i_base.precision import cpu_training_precision

DEMO_DVAE = {"model": "dvae", "num_layers": 3, "hidden_dim": 64, "num_resnet_blocks": 1, "num_tokens": 512,
             "emb_dim": 32}
CONFIGS = {
    "dvae-gumbel (baseline)": ({**DEMO_DVAE, "emb_dim": 256, "straight_through": True, "anneal_rate": 5e-3},
                               {"lr": 1e-3, "batch_size": 32}),
    "dvae-vq fp32": ({**DEMO_DVAE, "quantizer": "vq", "activation": "leaky_relu"},
                     {"lr": 3e-3, "batch_size": 16, "schedule": "constant", "channels_last": True}),
    "dvae-vq (demo)": ({**DEMO_DVAE, "quantizer": "vq", "activation": "leaky_relu"},
                       {"lr": 3e-3, "batch_size": 16, "schedule": "constant", "channels_last": True,
                        "precision": cpu_training_precision()}),
    "vqgan, no GAN": ({"model": "vqgan", "ch": 32, "ch_mult": (1, 2, 2, 4), "z_channels": 32, "emb_dim": 32,
                       "num_tokens": 512}, {"lr": 2e-3, "batch_size": 16}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180.0, help="training time budget per tokenizer")
    ap.add_argument("--data", help="a synthetic set written by `form_data synth` (default: make one in a temp dir)")
    ap.add_argument("--only", nargs="*", help="names of the configs to run")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else Path(tmp) / "synth"
        if not a.data:
            synth.write_dataset(data, n_train=4000, n_val=400, image_size=64, progress=False)
        rows = {}
        for name, (model_kw, run_kw) in CONFIGS.items():
            if a.only and not any(o in name for o in a.only):
                continue
            vc = VAEConfig(train_data=str(data / "train_clip.csv"), val_data=str(data / "val_clip.csv"),
                           image_size=64, eval_images=400, **model_kw)
            rc = RuntimeConfig(out_dir=str(Path(tmp) / name.split()[0]), max_steps=10**9, max_time=a.seconds,
                               warmup_steps=50, workers=1, log_every=50, save_every=10**9, **run_kw)
            result = train(vc, rc)
            rows[name] = {"psnr": result["eval"]["psnr"], "ssim": result["eval"]["ssim"],
                          "used_fraction": result["eval"]["used_fraction"], "steps": result["step"],
                          "images_per_s": result["train"]["samples_per_s"]}
    base = rows.get("dvae-gumbel (baseline)")
    print(f"\n{'tokenizer':<26}{'PSNR dB':>9}{'SSIM':>7}{'codes used':>12}{'steps':>7}{'img/s':>8}{'vs baseline':>13}")
    for name, r in rows.items():
        delta = f"{r['psnr'] - base['psnr']:+.1f} dB" if base else ""
        print(f"{name:<26}{r['psnr']:>9.2f}{r['ssim']:>7.3f}{r['used_fraction']:>11.0%}{r['steps']:>7}"
              f"{r['images_per_s']:>8.0f}{delta:>13}")
    if a.json:
        Path(a.json).write_text(json.dumps({"benchmark": "vae", "seconds": a.seconds, "results": rows,
                                            "machine": platform.platform()}, indent=2))


if __name__ == "__main__":
    main()
