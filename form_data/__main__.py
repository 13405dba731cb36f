"""``python -m form_data <command>``: synth, clean, download, export, vocab, judge, report, calibrate, steps, serve."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from form_data.cli import ArgumentParser, UserError, int_at_least, non_negative_int, positive_int, run


def _synth(a) -> None:
    from form_data import synth

    holdout = synth.parse_holdout(a.holdout)
    if a.raw:
        if not a.base_url:
            raise UserError("--raw needs --base-url (where `form_data serve OUT/www` will serve the images)")
        info = synth.write_raw(a.out, a.base_url, n=a.n, image_size=a.image_size, holdout=holdout, seed=a.seed,
                               progress=not a.quiet)
        print(f"raw CSV: {a.out}/wukong_raw.csv ({info['rows']} rows), keywords: {a.out}/keywords.txt, "
              f"images to serve: {a.out}/www")
    else:
        synth.write_dataset(a.out, n_train=a.train, n_val=a.val, image_size=a.image_size, holdout=holdout, seed=a.seed,
                            image_format=a.format, progress=not a.quiet)
        print(f"synthetic set: {a.out} (train {a.train}, val {a.val}, {len(holdout)} held-out combinations); "
              f"exports {a.out}/{{train,val}}_{{clip.csv,dalle.jsonl,brivl.jsonl}}, attributes {a.out}/attributes.jsonl")


def _clean(a) -> None:
    from form_data.clean import clean

    report = clean(a.inputs, a.out, keywords=a.keywords, url_col=a.url_col, caption_col=a.caption_col,
                   delimiter=a.delimiter, seed=a.seed, val_fraction=a.val_fraction, workers=a.workers or None,
                   progress=not a.quiet)
    print(report.table())
    print(f"wrote {a.out}/train.csv, {a.out}/val.csv, {a.out}/clean_report.json")


def _download(a) -> None:
    from form_data.download import download, format_report

    report = download(a.splits_dir, a.out, splits=a.splits, processes=a.processes, threads=a.threads,
                      timeout=a.timeout, retries=a.retries, encode_format=a.encode_format, progress=not a.quiet)
    print(format_report(report))
    print(f"wrote {a.out}/{{{','.join(a.splits)}}}/ and {a.out}/download_report.json")


def _export(a) -> None:
    from form_data.export import export

    counts = export(a.root, a.out, splits=a.splits, webdataset=a.webdataset, shard_size=a.shard_size,
                    progress=not a.quiet, attributes=a.attributes)
    out = a.out or a.root
    for split, n in counts.items():
        print(f"{split}: {n} samples -> {out}/{split}_clip.csv, {split}_dalle.jsonl, {split}_brivl.jsonl"
              + (f", wds/{split}-*.tar" if a.webdataset else ""))


def _vocab(a) -> None:
    from form_data.tokenizer import build_vocab, read_captions

    captions: list[str] = []
    for path in a.data:
        captions.extend(read_captions(path))
    if not captions:
        raise UserError("no captions found in " + ", ".join(a.data))
    tok = build_vocab(captions, a.out, min_count=a.min_count)
    print(f"vocab: {a.out} ({tok.vocab_size} entries from {len(captions)} captions)")


def _judge_train(a) -> None:
    from form_data.judge import train_judge

    report = train_judge(a.data, a.out, holdout=a.holdout, calib=a.calib, steps=a.steps, max_images=a.max_images,
                         seed=a.seed, progress=not a.quiet, image_size=a.image_size)
    acc = report["heldout_accuracy"]
    print(f"judge: {a.out}/judge.pt trained on {report['train_images']} images; held-out rendered images: shape "
          f"{acc['seen/shape']:.1%} seen / {acc.get('unseen/shape', float('nan')):.1%} unseen, colour "
          f"{acc['all/colour']:.1%}; calibration set {a.out}/calib.csv")


def _judge_score(a) -> None:
    from form_data.judge import score_dir

    result = score_dir(a.judge, a.images, a.prompt)
    print(f"{a.images}: colour {result['colour']:.1%}, shape {result['shape']:.1%}, both {result['both']:.1%} "
          f"of {result['n']} images -> {a.images}/judge.json")


def _report(a) -> None:
    from form_data.demo_report import build_report

    metrics = build_report(a.run, top_k=a.top_k, holdout=a.holdout, group_size=a.group_size)
    print(metrics["table"])
    print(f"wrote {a.run}/metrics.json and {a.run}/report.html")


def _calibrate(a) -> None:
    from form_data.device import calibrate, calibration_line
    from form_data.fileio import ensure_writable_dir, write_json

    if not a.seconds > 0:
        raise UserError(f"--seconds must be > 0, got {a.seconds}")
    if a.out:
        ensure_writable_dir(Path(a.out).parent)
    c = calibrate(a.seconds)
    print(calibration_line(c), flush=True)
    if a.out:
        write_json(a.out, c)


def _steps(a) -> None:
    from form_data.demo_steps import step_table

    if not (Path(a.run) / "timings.tsv").is_file():
        raise UserError(f"{a.run}: no timings.tsv (a `make demo` run directory, e.g. runs/demo)")
    print(step_table(a.run))


def _serve(a) -> None:
    from form_data.serve import LoopbackServer

    srv = LoopbackServer(a.directory, port=a.port)
    print(f"serving {a.directory} at {srv.url} (Ctrl-C to stop)", flush=True)
    try:
        srv.httpd.serve_forever()
    finally:
        srv.httpd.server_close()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m form_data", description="Data side of the toolkit: synthetic set, Wukong "
                       "cleaning, download, exports, vocab, the synthetic-image judge, the demo report.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    s = sub.add_parser("synth", help="write the embedded synthetic data set (or a raw Wukong-style CSV with --raw)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--raw", action="store_true", help="write a raw url,caption CSV + images to serve instead")
    s.add_argument("--base-url", help="with --raw: the URL the images will be served from, e.g. http://127.0.0.1:8765")
    s.add_argument("--n", type=positive_int, default=3000, help="with --raw: number of good rows")
    s.add_argument("--train", type=positive_int, default=4000, help="training images")
    s.add_argument("--val", type=non_negative_int, default=400, help="validation images (seen and held-out combinations)")
    s.add_argument("--image-size", type=int, default=64, help="image side in pixels (16-256)")
    s.add_argument("--holdout", default="default",
                   help="colour:shape pairs left out of training: 'default' (1 in 6), 'none', or e.g. '红:圆形,蓝:星形'")
    s.add_argument("--format", default="png", choices=["png", "jpg"], help="image file format")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_synth)

    c = sub.add_parser("clean", help="apply the caption rules, dedup, shuffle and split train/val")
    c.add_argument("inputs", nargs="+", help="CSV/TSV/CSV.gz/parquet files or directories of them")
    c.add_argument("--out", required=True, help="output directory for train.csv, val.csv, clean_report.json")
    c.add_argument("--keywords", help="keyword file (UTF-8, one per line); without it the keyword rule is off")
    c.add_argument("--url-col", default="url", help="url column name, or its 0-based position")
    c.add_argument("--caption-col", default="caption", help="caption column name, or its 0-based position")
    c.add_argument("--delimiter", help="CSV delimiter (default: ',' for .csv, tab for .tsv/.txt)")
    c.add_argument("--val-fraction", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=0, help="shuffle/split seed")
    c.add_argument("--workers", type=non_negative_int, default=0, help="threads for the rules (0: one per CPU, at most 8)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_clean)

    d = sub.add_parser("download", help="download the images of the cleaned splits with img2dataset")
    d.add_argument("splits_dir", help="directory holding {split}.csv from `clean`")
    d.add_argument("--out", required=True, help="output directory ({split}/ folders + download_report.json)")
    d.add_argument("--splits", nargs="+", default=["train", "val"])
    d.add_argument("--processes", type=positive_int, default=1)
    d.add_argument("--threads", type=positive_int, default=32)
    d.add_argument("--timeout", type=positive_int, default=10, help="seconds per request")
    d.add_argument("--retries", type=non_negative_int, default=0)
    d.add_argument("--encode-format", default="jpg", help="jpg, png or webp")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_download)

    e = sub.add_parser("export", help="write open_clip CSV, DALLE JSONL, BriVL JSONL (and webdataset shards)")
    e.add_argument("root", help="download directory (with {split}/ folders)")
    e.add_argument("--out", help="where to write the exports (default: ROOT; paths stay relative)")
    e.add_argument("--splits", nargs="+", default=["train", "val"])
    e.add_argument("--webdataset", action="store_true", help="also write webdataset .tar shards under wds/")
    e.add_argument("--shard-size", type=positive_int, default=10000)
    e.add_argument("--attributes", help="per-URL ground-truth JSONL (synth --raw's attributes.jsonl) -> OUT/attributes.jsonl")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_export)

    v = sub.add_parser("vocab", help="build a WordPiece vocab.txt from training captions")
    v.add_argument("data", nargs="+", help="caption files: split CSV, open_clip CSV, DALLE or BriVL JSONL")
    v.add_argument("--out", required=True, help="vocab.txt to write")
    v.add_argument("--min-count", type=positive_int, default=1)
    v.set_defaults(func=_vocab)

    j = sub.add_parser("judge", help="colour/shape judge of synthetic-style images (no model under test involved)")
    jsub = j.add_subparsers(dest="judge_command", required=True, parser_class=ArgumentParser)
    jt = jsub.add_parser("train", help="train the colour-blind shape classifier on synthetic training images")
    jt.add_argument("--data", required=True, help="training split (CSV/JSONL/folder) with synthetic captions")
    jt.add_argument("--out", required=True, help="directory for judge.pt, judge_report.json and a calibration set")
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
    js.add_argument("images", help="directory with {i}.png|jpg (and meta.json from dalle_gen.py)")
    js.add_argument("--judge", required=True, help="directory or judge.pt from `judge train`")
    js.add_argument("--prompt", help="the prompt (default: meta.json's)")
    js.set_defaults(func=_judge_score)

    r = sub.add_parser("report", help="the demo's metrics.json and report.html from a finished demo run directory")
    r.add_argument("run", help="demo run directory (runs/demo)")
    r.add_argument("--top-k", type=positive_int, default=4, help="reranked images kept per prompt (seed: 4)")
    r.add_argument("--group-size", type=positive_int, default=32, help="samples per rerank draw (seed group)")
    r.add_argument("--holdout", default="default", help="combinations unseen in training (as in `synth`)")
    r.set_defaults(func=_report)

    cb = sub.add_parser("calibrate", help="print the device, CPU capability and the fp32 matmul GFLOP/s (about 1 s)")
    cb.add_argument("--out", help="also write the figures to this JSON file")
    cb.add_argument("--seconds", type=float, default=1.0, help="how long to time the matmul")
    cb.set_defaults(func=_calibrate)

    st = sub.add_parser("steps", help="the demo's per-step wall times (RUN/timings.tsv), scaled to the slow CPU kind")
    st.add_argument("run", help="demo run directory (runs/demo)")
    st.set_defaults(func=_steps)

    sv = sub.add_parser("serve", help="serve a directory over loopback HTTP (for the synthetic raw images)")
    sv.add_argument("directory")
    sv.add_argument("--port", type=non_negative_int, default=8765)
    sv.set_defaults(func=_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:], prog="python -m form_data")
