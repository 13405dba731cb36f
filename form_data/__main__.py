"""``python -m form_data <command>``: synth, clean, download, export, vocab, serve."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from zh_t2i_base.cli import (
    IN_DIR,
    OUT_DIR,
    OUT_FILE,
    ArgumentParser,
    PathArg,
    UserError,
    finite_float,
    non_negative_int,
    port_number,
    positive_int,
    run,
    subcommands,
)


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
              f"exports {a.out}/{{train,val}}_{{clip.csv,dalle.jsonl,brivl.jsonl}}, "
              f"attributes {a.out}/attributes.jsonl")


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
        skipped = counts.skipped.get(split, {})
        print(f"{split}: {n} samples -> {out}/{split}_clip.csv, {split}_dalle.jsonl, {split}_brivl.jsonl"
              + (f", wds/{split}-*.tar" if a.webdataset else "")
              + (f"; skipped {sum(skipped.values())} ({', '.join(f'{k} {v}' for k, v in skipped.items())})"
                 if skipped else ""))


def _vocab(a) -> None:
    from form_data.tokenizer import build_vocab, read_captions

    captions: list[str] = []
    for path in a.data:
        captions.extend(read_captions(path))
    if not captions:
        raise UserError("no captions found in " + ", ".join(a.data))
    tok = build_vocab(captions, a.out, min_count=a.min_count)
    print(f"vocab: {a.out} ({tok.vocab_size} entries from {len(captions)} captions)")


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
                       "cleaning, download, exports, vocab, loopback serving.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    s = sub.add_parser("synth", help="write the embedded synthetic data set (or a raw Wukong-style CSV with --raw)")
    s.add_argument("--out", type=OUT_DIR, required=True, help="output directory")
    s.add_argument("--raw", action="store_true", help="write a raw url,caption CSV + images to serve instead")
    s.add_argument("--base-url", help="with --raw: the URL the images will be served from, e.g. http://127.0.0.1:8765")
    s.add_argument("--n", type=positive_int, default=3000, help="with --raw: number of good rows")
    s.add_argument("--train", type=positive_int, default=4000, help="training images")
    s.add_argument("--val", type=non_negative_int, default=400,
                   help="validation images (seen and held-out combinations)")
    s.add_argument("--image-size", type=int, default=64, help="image side in pixels (16-256)")
    s.add_argument("--holdout", default="default",
                   help="colour:shape pairs left out of training: 'default' (1 in 6), 'none', "
                        "or e.g. '红:圆形,蓝:星形'")
    s.add_argument("--format", default="png", choices=["png", "jpg"], help="image file format")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_synth)

    c = sub.add_parser("clean", help="apply the caption rules, dedup, shuffle and split train/val")
    c.add_argument("inputs", nargs="+", type=PathArg("in", content="table"),
                   help="CSV/TSV/CSV.gz/parquet files or directories of them")
    c.add_argument("--out", type=OUT_DIR, required=True,
                   help="output directory for train.csv, val.csv, clean_report.json")
    c.add_argument("--keywords", type=PathArg("in", "file", "text"),
                   help="keyword file (UTF-8, one per line); without it the keyword rule is off")
    c.add_argument("--url-col", default="url", help="url column name, or its 0-based position")
    c.add_argument("--caption-col", default="caption", help="caption column name, or its 0-based position")
    c.add_argument("--delimiter", help="CSV delimiter (default: ',' for .csv, tab for .tsv/.txt)")
    c.add_argument("--val-fraction", type=finite_float(0.0), default=0.1)
    c.add_argument("--seed", type=int, default=0, help="shuffle/split seed")
    c.add_argument("--workers", type=non_negative_int, default=0,
                   help="threads for the rules (0: one per CPU, at most 8)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_clean)

    d = sub.add_parser("download", help="download the images of the cleaned splits with img2dataset")
    d.add_argument("splits_dir", type=PathArg("in", "dir", "tables"), help="directory holding {split}.csv from `clean`")
    d.add_argument("--out", type=OUT_DIR, required=True,
                   help="output directory ({split}/ folders + download_report.json)")
    d.add_argument("--splits", nargs="+", default=["train", "val"])
    d.add_argument("--processes", type=positive_int, default=1)
    d.add_argument("--threads", type=positive_int, default=32)
    d.add_argument("--timeout", type=positive_int, default=10, help="seconds per request")
    d.add_argument("--retries", type=non_negative_int, default=0)
    d.add_argument("--encode-format", default="jpg", help="jpg, png or webp")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_download)

    e = sub.add_parser("export", help="write open_clip CSV, DALLE JSONL, BriVL JSONL (and webdataset shards)")
    e.add_argument("root", type=PathArg("in", "dir", "downloads"), help="download directory (with {split}/ folders)")
    e.add_argument("--out", type=OUT_DIR, help="where to write the exports (default: ROOT; paths stay relative)")
    e.add_argument("--splits", nargs="+", default=["train", "val"])
    e.add_argument("--webdataset", action="store_true", help="also write webdataset .tar shards under wds/")
    e.add_argument("--shard-size", type=positive_int, default=10000)
    e.add_argument("--attributes", type=PathArg("in", "file", "jsonl"),
                   help="per-URL ground-truth JSONL (synth --raw's attributes.jsonl) -> OUT/attributes.jsonl")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_export)

    v = sub.add_parser("vocab", help="build a WordPiece vocab.txt from training captions")
    v.add_argument("data", nargs="+", type=PathArg("in", "file", "table"),
                   help="caption files: split CSV, open_clip CSV, DALLE or BriVL JSONL")
    v.add_argument("--out", type=OUT_FILE, required=True, help="vocab.txt to write")
    v.add_argument("--min-count", type=positive_int, default=1)
    v.set_defaults(func=_vocab)

    sv = sub.add_parser("serve", help="serve a directory over loopback HTTP (for the synthetic raw images)")
    sv.add_argument("directory", type=IN_DIR)
    sv.add_argument("--port", type=port_number, default=8765, help="TCP port on 127.0.0.1; 0: any free one")
    sv.set_defaults(func=_serve)
    return p


def parsers() -> dict[str, ArgumentParser]:
    return subcommands(build_parser())


MOVED = ("judge", "report", "calibrate", "steps")  # the demo's commands, now in its own package


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MOVED:
        raise UserError(f"`python -m form_data {argv[0]}` moved: run `python -m zh_t2i_demo {argv[0]}`")
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:], prog="python -m form_data")
