"""``python -m styled_vq`` (train, stage 1 or 2) and the steps around it:

    python -m styled_vq --stage 1 --preset tiny36 --train-data D/train_clip.csv --out-dir runs/svq1
    python -m styled_vq dump --model runs/svq1 --data D/train_clip.csv --out runs/svq_feats
    python -m styled_vq kmeans --features runs/svq_feats --k 64 --out runs/svq_codebook.pt
    python -m styled_vq attach --model runs/svq1 --codebook runs/svq_codebook.pt --out runs/svq2
    python -m styled_vq --stage 2 --init-from runs/svq2 --train-data ... --out-dir runs/svq2ft   # optional
    python -m styled_vq analyze --model runs/svq1 --data D/val_clip.csv --out runs/svq_order
    python -m styled_vq convert --checkpoint model_11.pt --version v1 --out runs/svq_orig

``dump`` and ``kmeans`` run under torchrun too (``bash scripts/train_styled_vq.sh dump ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from train_runtime import RuntimeConfig
from train_runtime.config import add_dataclass_args, load_config_file, parse_configs
from zh_t2i_base.cli import (
    OUT_DIR,
    OUT_FILE,
    ArgumentParser,
    PathArg,
    UserError,
    finite_float,
    int_at_least,
    non_negative_int,
    positive_int,
    run,
)

RUNTIME_DEFAULTS = {"lr": 1e-4, "weight_decay": 0.2, "beta2": 0.98, "grad_clip": 1.0, "batch_size": 64,
                    "max_steps": 10_000, "warmup_steps": 500, "save_every": 1000, "out_dir": "runs/styled_vq"}
COMMANDS = ("dump", "kmeans", "attach", "analyze", "convert")


def train_parser() -> ArgumentParser:
    from styled_vq.train import SVQTrainConfig
    from vae_train.styled import StyledVQConfig

    p = ArgumentParser(prog="python -m styled_vq",
                       description="Train a Styled-VQ tokenizer on the shared runtime (stage 1: continuous tokens; "
                                   "stage 2: through a frozen k-means codebook). Other commands: "
                                   f"{', '.join(COMMANDS)} (`python -m styled_vq dump --help` ...).")
    p.add_argument("--config", type=PathArg("in", "file", "yaml"), help="YAML/JSON file of options (flags override it)")
    add_dataclass_args(p, SVQTrainConfig, "training")
    add_dataclass_args(p, StyledVQConfig, "model (ignored with --init-from, whose checkpoint has its own)")
    add_dataclass_args(p, RuntimeConfig, "run", defaults=RUNTIME_DEFAULTS)
    return p


def _preset_defaults(argv: list[str]) -> dict:
    """The model fields of ``--preset`` (from the flags or the config file), as defaults under the explicit flags."""
    from vae_train.styled import PRESETS

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    from_file = load_config_file(known.config) if known.config and Path(known.config).is_file() else {}
    name = known.preset or from_file.get("preset") or ""  # a bad --config is reported by the full parser
    if name and name not in PRESETS:
        raise UserError(f"unknown --preset {name!r} (known: {', '.join(PRESETS)})")
    return dict(PRESETS[name]) if name else {}


def sub_parser(command: str) -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m styled_vq {command}")
    if command == "dump":
        p.description = "Continuous stage-1 tokens of a data set, one shard per rank, for k-means."
        p.add_argument("--model", type=PathArg("in", content="checkpoint"), required=True,
                       help="stage-1 run dir / ckpt-*.pt / model.safetensors")
        p.add_argument("--data", type=PathArg("in", content="images"), required=True,
                       help="CSV / JSONL / image folder / JSON list of paths")
        p.add_argument("--out", type=OUT_DIR, required=True, help="output directory (shards + meta.json)")
        p.add_argument("--batch-size", type=positive_int, default=64)
        p.add_argument("--workers", type=non_negative_int, default=2)
        p.add_argument("--device", default="auto")
    elif command == "kmeans":
        p.description = "The codebook: k-means over dumped tokens (one codebook shared by all positions)."
        p.add_argument("--features", type=PathArg("in", "dir", "features"), required=True,
                       help="output directory of `dump`")
        p.add_argument("--k", type=positive_int, required=True, help="codebook size (the original used 194,560)")
        p.add_argument("--out", type=OUT_FILE, required=True, help="codebook file to write (.pt)")
        p.add_argument("--iters", type=positive_int, default=50, help="most Lloyd iterations")
        p.add_argument("--tol", type=finite_float(0.0), default=1e-4,
                       help="stop when the centre shift <= tol x data variance")
        p.add_argument("--groups", type=non_negative_int, default=0, help="centre groups for pruning (0: auto)")
        p.add_argument("--warm-start", type=non_negative_int, default=0,
                       help="first run k-means on a sample of this many x K vectors and start from its centres "
                            "(0: off)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto")
    elif command == "attach":
        p.description = "A stage-2 model: stage-1 weights + a k-means codebook, as OUT/model.safetensors."
        p.add_argument("--model", type=PathArg("in", content="checkpoint"), required=True)
        p.add_argument("--codebook", type=PathArg("in", "file", "checkpoint"), required=True,
                       help="file from `kmeans` (or the original's k_means.pt)")
        p.add_argument("--out", type=OUT_DIR, required=True)
    elif command == "analyze":
        p.description = "Token-order analysis: MSE rise per replaced token position; writes JSON + PNG."
        p.add_argument("--model", type=PathArg("in", content="checkpoint"), required=True)
        p.add_argument("--data", type=PathArg("in", content="images"), required=True)
        p.add_argument("--out", type=OUT_DIR, required=True, help="output directory")
        p.add_argument("--images", type=int_at_least(2), default=256)
        p.add_argument("--batch-size", type=positive_int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto")
    else:
        p.description = "Import an original Styled_vae_vq checkpoint (model_{epoch}.pt) as OUT/model.safetensors."
        p.add_argument("--checkpoint", type=PathArg("in", "file", "checkpoint"), required=True)
        p.add_argument("--out", type=OUT_DIR, required=True)
        p.add_argument("--version", choices=("v1", "v2"), help="default: v2 if the file has the V2 prototypes")
        p.add_argument("--codebook", help="'embedded' (the stored quantize table) or a k_means.pt file")
        p.add_argument("--heads", type=positive_int, default=16, help="encoder heads (not visible in the weights)")
        p.add_argument("--decoder-heads", type=non_negative_int, default=0, help="0: decoder width // 64")
        p.add_argument("--refiner-groups", type=positive_int, default=8)
    return p


def parsers() -> dict[str, ArgumentParser]:
    return {"": train_parser(), **{c: sub_parser(c) for c in COMMANDS}}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is not None:
        a = sub_parser(command).parse_args(argv[1:])
        if command == "dump":
            from styled_vq.train import dump

            out = dump(a.model, a.data, a.out, a.batch_size, a.workers, a.device)
        elif command == "kmeans":
            from styled_vq.train import build_codebook

            out = build_codebook(a.features, a.k, a.out, a.iters, a.tol, a.seed, a.groups, a.device, a.warm_start)
        elif command == "attach":
            from styled_vq.train import attach

            out = attach(a.model, a.codebook, a.out)
        elif command == "analyze":
            from styled_vq.analysis import analyze

            out = analyze(a.model, a.data, a.out, a.images, a.batch_size, a.seed, a.device)
        else:
            from styled_vq.convert import from_original
            from styled_vq.train import export

            model = from_original(a.checkpoint, a.version, a.codebook, heads=a.heads, decoder_heads=a.decoder_heads,
                                  refiner_groups=a.refiner_groups)
            out = {"out": str(export(model, a.out)), **model.checkpoint_meta()}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    from styled_vq.train import SVQTrainConfig, train
    from vae_train.styled import StyledVQConfig

    defaults = {**RUNTIME_DEFAULTS, **_preset_defaults(argv)}
    _, (tc, mc, rc) = parse_configs(train_parser(), argv, SVQTrainConfig, StyledVQConfig, RuntimeConfig,
                                    defaults=defaults)
    print(json.dumps(train(mc, tc, rc), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run(main, prog="python -m styled_vq")
