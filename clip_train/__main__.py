"""``python -m clip_train`` (train a Chinese CLIP on the shared runtime) and ``python -m clip_train eval`` (retrieval
metrics of a checkpoint on a split)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from clip_train.train import ClipConfig
from train_runtime import RuntimeConfig
from train_runtime.config import add_dataclass_args, parse_configs
from zh_t2i_base.cli import OUT_FILE, ArgumentParser, PathArg, non_negative_int, positive_int, run

RUNTIME_DEFAULTS = {"lr": 5e-4, "weight_decay": 0.1, "beta2": 0.98, "batch_size": 64, "max_steps": 1000,
                    "warmup_steps": 100, "save_every": 500, "out_dir": "runs/clip"}


def train_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m clip_train",
                       description="Train a Chinese CLIP (open_clip models, ClipLoss) on the shared runtime. "
                                   "Other command: `python -m clip_train eval --help`.")
    p.add_argument("--config", type=PathArg("in", "file", "yaml"), help="YAML/JSON file of options (flags override it)")
    add_dataclass_args(p, ClipConfig, "model and data")
    add_dataclass_args(p, RuntimeConfig, "run", defaults=RUNTIME_DEFAULTS)
    seed = p.add_argument_group("the seed's open_clip names")
    seed.add_argument("--wd", dest="weight_decay", type=float, default=argparse.SUPPRESS, help="= --weight-decay")
    seed.add_argument("--warmup", dest="warmup_steps", type=int, default=argparse.SUPPRESS, help="= --warmup-steps")
    return p


def eval_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m clip_train eval",
                       description="Val loss, image<->text R@1/5/10, mean recall and ranks of a CLIP checkpoint "
                                   "(attribute-level recall with --attributes, zero-shot with --zeroshot-labels).")
    p.add_argument("--checkpoint", type=PathArg("in", content="checkpoint"), required=True,
                   help="run dir / ckpt-*.pt / model.safetensors of python -m clip_train")
    p.add_argument("--data", type=PathArg("in", content="images"), required=True,
                   help="split to evaluate (CSV / JSONL / image folder)")
    p.add_argument("--attributes", type=PathArg("in", "file", "jsonl"), default="",
                   help="the synthetic set's attributes.jsonl")
    p.add_argument("--zeroshot-labels", type=PathArg("in", "file", "text"), default="",
                   help="file of Chinese labels, one a line")
    p.add_argument("--zeroshot-template", default="{}", help="prompt for each label")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-separator", default="\t")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=OUT_FILE, default="", help="also write the metrics to this JSON file")
    return p


def parsers() -> dict[str, ArgumentParser]:
    return {"": train_parser(), "eval": eval_parser()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        from clip_train.eval import evaluate_checkpoint

        a = eval_parser().parse_args(argv[1:])
        metrics = evaluate_checkpoint(a.checkpoint, a.data, attributes=a.attributes, labels_file=a.zeroshot_labels,
                                      template=a.zeroshot_template, img_key=a.csv_img_key,
                                      caption_key=a.csv_caption_key, sep=a.csv_separator, batch_size=a.batch_size,
                                      workers=a.workers, device=a.device, out=a.out)
        print(json.dumps(metrics, ensure_ascii=False))
        return 0
    from clip_train.train import train

    _, (cc, rc) = parse_configs(train_parser(), argv, ClipConfig, RuntimeConfig, defaults=RUNTIME_DEFAULTS)
    print(json.dumps(train(cc, rc), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run(main, prog="python -m clip_train")
