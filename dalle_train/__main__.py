"""``python -m dalle_train``: train the DALLE transformer (on pre-tokenized data by default)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from dalle_train.train import DALLETrainConfig
from train_runtime import RuntimeConfig
from train_runtime.config import parse_configs, training_parser
from zh_t2i_base.cli import ArgumentParser, run

RUNTIME_DEFAULTS = {"lr": 3e-4, "batch_size": 32, "max_steps": 10000, "warmup_steps": 200, "weight_decay": 0.01,
                    "beta2": 0.96, "grad_clip": 0.5, "save_every": 1000, "out_dir": "runs/dalle"}


def parser() -> ArgumentParser:
    return training_parser("python -m dalle_train", "Train a DALLE transformer over image tokens with Chinese "
                           "captions, on the shared runtime. Pre-tokenize the images first: "
                           "`python -m vae_train tokenize`.",
                           DALLETrainConfig, RUNTIME_DEFAULTS)


def parsers() -> dict[str, ArgumentParser]:
    return {"": parser()}


def main(argv: Sequence[str] | None = None) -> int:
    from dalle_train.train import train

    _, (dc, rc) = parse_configs(parser(), list(sys.argv[1:] if argv is None else argv), DALLETrainConfig,
                                RuntimeConfig, defaults=RUNTIME_DEFAULTS)
    result = train(dc, rc)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run(main, prog="python -m dalle_train")
