"""``python -m zh_t2i_demo <command>``: judge train / judge score, report, calibrate, steps: the demo's evaluation."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from zh_t2i_base.cli import (
    IN_DIR,
    OUT_DIR,
    OUT_FILE,
    ArgumentParser,
    PathArg,
    UserError,
    finite_float,
    int_at_least,
    positive_int,
    run,
    subcommands,
)


def _judge_train(a) -> None:
    from zh_t2i_demo.judge import train_judge

    report = train_judge(a.data, a.out, holdout=a.holdout, calib=a.calib, steps=a.steps, max_images=a.max_images,
                         seed=a.seed, progress=not a.quiet, image_size=a.image_size)
    acc = report["heldout_accuracy"]
    print(f"judge: {a.out}/judge.pt trained on {report['train_images']} images; held-out rendered images: shape "
          f"{acc['seen/shape']:.1%} seen / {acc.get('unseen/shape', float('nan')):.1%} unseen, colour "
          f"{acc['all/colour']:.1%}; calibration set {a.out}/calib.csv")


def _judge_score(a) -> None:
    from zh_t2i_demo.judge import score_dir

    result = score_dir(a.judge, a.images, a.prompt)
    print(f"{a.images}: colour {result['colour']:.1%}, shape {result['shape']:.1%}, both {result['both']:.1%} "
          f"of {result['n']} images -> {a.images}/judge.json")


def _report(a) -> None:
    from zh_t2i_demo.report import build_report

    metrics = build_report(a.run, top_k=a.top_k, holdout=a.holdout, group_size=a.group_size)
    print(metrics["table"])
    print(f"wrote {a.run}/metrics.json and {a.run}/report.html")


def _calibrate(a) -> None:
    from zh_t2i_base.fileio import ensure_writable_dir, write_json
    from zh_t2i_demo.calibrate import calibrate, calibration_line

    if a.out:
        ensure_writable_dir(Path(a.out).parent)
    c = calibrate(a.seconds)
    print(calibration_line(c), flush=True)
    if a.out:
        write_json(a.out, c)


def _steps(a) -> None:
    from zh_t2i_demo.steps import step_table

    if not (Path(a.run) / "timings.tsv").is_file():
        raise UserError(f"{a.run}: no timings.tsv (a `make demo` run directory, e.g. runs/demo)")
    print(step_table(a.run))


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m zh_t2i_demo", description="The demo's evaluation: the synthetic-image judge, "
                       "the report, the machine calibration and the per-step table.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    j = sub.add_parser("judge", help="colour/shape judge of synthetic-style images (no model under test involved)")
    jsub = j.add_subparsers(dest="judge_command", required=True, parser_class=ArgumentParser)
    jt = jsub.add_parser("train", help="train the colour-blind shape classifier on synthetic training images")
    jt.add_argument("--data", type=PathArg("in", content="images"), required=True,
                    help="training split (CSV/JSONL/folder) with synthetic captions")
    jt.add_argument("--out", type=OUT_DIR, required=True,
                    help="directory for judge.pt, judge_report.json and a calibration set")
    jt.add_argument("--holdout", default="default", help="combinations unseen in training (as in `synth`)")
    jt.add_argument("--calib", type=positive_int, default=480, help="rendered held-out images of all combinations")
    jt.add_argument("--steps", type=positive_int, default=120, help="training batches of 64")
    jt.add_argument("--max-images", type=positive_int, default=4000)
    jt.add_argument("--image-size", type=int_at_least(8), default=64,
                    help="side of the images it will judge (below 64: trained and judging at that side)")
    jt.add_argument("--seed", type=int, default=0)
    jt.add_argument("--quiet", action="store_true")
    jt.set_defaults(func=_judge_train)
    js = jsub.add_parser("score", help="judge the images of a dalle_gen.py output directory against its prompt")
    js.add_argument("images", type=IN_DIR, help="directory with {i}.png|jpg (and meta.json from dalle_gen.py)")
    js.add_argument("--judge", type=PathArg("in", content="checkpoint"), required=True,
                    help="directory or judge.pt from `judge train`")
    js.add_argument("--prompt", help="the prompt (default: meta.json's)")
    js.set_defaults(func=_judge_score)

    r = sub.add_parser("report", help="the demo's metrics.json and report.html from a finished demo run directory")
    r.add_argument("run", type=IN_DIR, help="demo run directory (runs/demo)")
    r.add_argument("--top-k", type=positive_int, default=4, help="reranked images kept per prompt (seed: 4)")
    r.add_argument("--group-size", type=positive_int, default=32, help="samples per rerank draw (seed group)")
    r.add_argument("--holdout", default="default", help="combinations unseen in training (as in `synth`)")
    r.set_defaults(func=_report)

    cb = sub.add_parser("calibrate", help="print the device, CPU capability and the fp32 matmul GFLOP/s (about 1 s)")
    cb.add_argument("--out", type=OUT_FILE, help="also write the figures to this JSON file")
    cb.add_argument("--seconds", type=finite_float(0.01, 60.0), default=1.0, help="how long to time the matmul")
    cb.set_defaults(func=_calibrate)

    st = sub.add_parser("steps", help="the demo's per-step wall times (RUN/timings.tsv), scaled to the slow CPU kind")
    st.add_argument("run", type=IN_DIR, help="demo run directory (runs/demo)")
    st.set_defaults(func=_steps)

    return p


def parsers() -> dict[str, ArgumentParser]:
    return subcommands(build_parser())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:], prog="python -m zh_t2i_demo")
