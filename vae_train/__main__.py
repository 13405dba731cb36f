"""``python -m vae_train`` (train a dVAE or VQGAN), ``python -m vae_train tokenize`` (pre-tokenize a split),
``python -m vae_train eval`` (PSNR / SSIM / codebook usage of a checkpoint on a split)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from train_runtime import RuntimeConfig
from train_runtime.config import parse_configs, training_parser
from vae_train.train import VAEConfig
from zh_t2i_base.cli import OUT_DIR, OUT_FILE, ArgumentParser, PathArg, non_negative_int, positive_int, run

RUNTIME_DEFAULTS = {"lr": 1e-3, "batch_size": 64, "max_steps": 2000, "warmup_steps": 100, "save_every": 500,
                    "out_dir": "runs/vae"}


def train_parser() -> ArgumentParser:
    return training_parser("python -m vae_train", "Train an image tokenizer (dVAE or taming-compatible VQGAN) on the "
                           "shared runtime. Other commands: `python -m vae_train tokenize --help`, `... eval --help`.",
                           VAEConfig, RUNTIME_DEFAULTS)


def tokenize_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vae_train tokenize",
                       description="Encode a data set once into a token file for DALLE training.")
    p.add_argument("--tokenizer", type=PathArg("in", content="checkpoint"), required=True,
                   help="our run dir / ckpt-*.pt / model.safetensors, or a taming .ckpt")
    p.add_argument("--yaml", type=PathArg("in", "file", "yaml"), help="taming model.yaml (with a taming .ckpt)")
    p.add_argument("--data", type=PathArg("in", content="images"), required=True,
                   help="split to encode (CSV / JSONL / image folder)")
    p.add_argument("--out", type=OUT_FILE, required=True, help="token file to write (.pt)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--hflip", action="store_true",
                   help="also encode each image mirrored, as an extra sample with the same caption (augmentation)")
    return p


def eval_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m vae_train eval", description="Reconstruction quality and codebook usage.")
    p.add_argument("--tokenizer", type=PathArg("in", content="checkpoint"), required=True)
    p.add_argument("--yaml", type=PathArg("in", "file", "yaml"), help="taming model.yaml (with a taming .ckpt)")
    p.add_argument("--data", type=PathArg("in", content="images"), required=True)
    p.add_argument("--max-images", type=positive_int, default=1000)
    p.add_argument("--grid", type=OUT_FILE, help="also write a reconstruction grid PNG here")
    p.add_argument("--save-recon", type=OUT_DIR,
                   help="also write every reconstruction as DIR/{i}.png (i = position in --data)")
    p.add_argument("--out", type=OUT_FILE, help="also write the metrics as JSON here")
    p.add_argument("--device", default="auto")
    return p


def parsers() -> dict[str, ArgumentParser]:
    return {"": train_parser(), "tokenize": tokenize_parser(), "eval": eval_parser()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tokenize":
        from vae_train.tokenize import tokenize

        a = tokenize_parser().parse_args(argv[1:])
        print(json.dumps(tokenize(a.tokenizer, a.data, a.out, a.batch_size, a.workers, a.device, a.yaml,
                                         hflip=a.hflip),
                         ensure_ascii=False))
        return 0
    if argv and argv[0] == "eval":
        from vae_train.evaluate import evaluate

        a = eval_parser().parse_args(argv[1:])
        result = evaluate(a.tokenizer, a.data, a.max_images, a.grid, a.device, a.yaml, recon_dir=a.save_recon)
        if a.out:
            from zh_t2i_base.fileio import write_json

            write_json(a.out, result)
        print(json.dumps(result, ensure_ascii=False))
        return 0
    from vae_train.train import train

    _, (vc, rc) = parse_configs(train_parser(), argv, VAEConfig, RuntimeConfig, defaults=RUNTIME_DEFAULTS)
    result = train(vc, rc)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run(main, prog="python -m vae_train")
