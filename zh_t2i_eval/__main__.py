"""``python -m zh_t2i_eval GEN --real REAL ...``: evaluate generated images against real ones, offline.

GEN is a ``dalle_gen.py`` output: ``GEN/{i}.png`` + ``meta.json`` (its prompt), or ``GEN/p{i}/`` per prompt (``@FILE``).
REAL is a folder or listing of real images (CSV/JSONL, image folder, webdataset shards). Computes:
- FID and KID (torch-fidelity's InceptionV3; weights from ``--inception-weights`` only, never downloaded; ``--no-fid``
  skips them);
- with ``--scorer``: the mean text-image score of any registered reranking scorer, overall and per prompt;
- with ``--judge``: the Fréchet distance between the demo judge's penultimate features of the generated and the real
  images (works offline on the demo's synthetic set).
Writes one JSON (``--out``, default ``GEN/eval.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from zh_t2i_base.cli import (
    IN_DIR,
    OUT_FILE,
    ArgumentParser,
    PathArg,
    int_at_least,
    positive_int,
    prompt_text,
    run,
)
from zh_t2i_base.precision import PRECISIONS
from zh_t2i_eval.inception import INCEPTION_FILE, WHERE


class WeightsArg(PathArg):
    """An input file whose parse-time errors also name the file expected and where to get it."""

    def __init__(self, hint: str):
        super().__init__("in", "file", content="checkpoint")
        self.hint = hint

    def _check_input(self, path: Path) -> None:
        try:
            super()._check_input(path)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}; {self.hint}") from None


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m zh_t2i_eval", description="Evaluate generated images against real ones, "
                       "offline: FID/KID (torch-fidelity, local Inception weights), a reranking scorer's mean "
                       "text-image score, the judge-space Fréchet distance. Writes one JSON, prints a table.")
    p.add_argument("gen", type=IN_DIR, help="generated images: GEN/{i}.png (+ meta.json) or GEN/p{i}/ per prompt")
    p.add_argument("--real", type=PathArg("in", content="images", urls=True),
                   help="real images: a folder, a CSV/JSONL listing or webdataset shards (needed by FID/KID, --judge)")
    fid = p.add_mutually_exclusive_group()
    fid.add_argument("--inception-weights", type=WeightsArg(f"expected {WHERE}"),
                     help=f"FID/KID: a local copy of torch-fidelity's {INCEPTION_FILE}")
    fid.add_argument("--no-fid", action="store_true", help="skip FID/KID (no Inception weights needed)")
    p.add_argument("--judge", type=PathArg("in", content="checkpoint"),
                   help="the demo judge (directory or judge.pt of `python -m zh_t2i_demo judge train`): Fréchet "
                        "distance of its penultimate features, generated vs real")
    p.add_argument("--scorer", help="a reranking scorer (as clip_sort.py's --scorer, e.g. clip:runs/clip): mean "
                   "text-image score, overall and per prompt")
    p.add_argument("--prompt", type=prompt_text, help="the prompt, where no meta.json gives it (for --scorer)")
    p.add_argument("--out", type=OUT_FILE, help="the JSON to write; when not given, GEN/eval.json")
    p.add_argument("--max-real", type=positive_int, help="use at most this many real images (default: all)")
    p.add_argument("--kid-subsets", type=positive_int, default=100, help="KID: random subsets averaged")
    p.add_argument("--kid-subset-size", type=int_at_least(2), default=1000,
                   help="KID: images per subset (at most the smaller set's size)")
    p.add_argument("--seed", type=int, default=0, help="KID's subset draws")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images encoded together")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="the scorer's precision")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickle when loading the scorer's weights")
    return p


def parsers() -> dict[str, ArgumentParser]:
    return {"": build_parser()}


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from zh_t2i_base.fileio import ensure_writable_dir, write_json
    from zh_t2i_eval.samples import evaluate, table

    result = evaluate(a.gen, a.real, judge=a.judge, scorer=a.scorer, inception_weights=a.inception_weights,
                      fid=not a.no_fid, prompt=a.prompt, max_real=a.max_real, batch_size=a.batch_size,
                      device=a.device, precision=a.precision, trust_checkpoint=a.trust_checkpoint,
                      kid_subsets=a.kid_subsets, kid_subset_size=a.kid_subset_size, seed=a.seed)
    out = Path(a.out) if a.out else Path(a.gen) / "eval.json"
    ensure_writable_dir(out.parent)
    write_json(out, result)
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:], prog="python -m zh_t2i_eval")
