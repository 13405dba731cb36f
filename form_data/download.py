"""Image download of the cleaned splits with img2dataset (resumable; scales out to Spark/Ray with its distributors).

The seed's image rules: shrink to fit 512x512 keeping the aspect ratio (never enlarge), drop images whose aspect ratio
exceeds 3, drop images whose shorter side is under 50 px (the seed's ``width*width > 1000`` check was a bug: it is not
copied). Failures (404, timeout, undecodable bytes, rule violations) are counted in ``download_report.json``; none of
them stops the run.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from form_data.clean import read_split
from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import ensure_writable_dir, write_json

MAX_SIDE = 512
MAX_ASPECT = 3.0
MIN_SIDE = 50

_CATEGORIES = (
    ("too_small", re.compile(r"too small", re.IGNORECASE)),
    ("too_elongated", re.compile(r"aspect ratio", re.IGNORECASE)),
    ("http_404", re.compile(r"\b404\b")),
    ("http_error", re.compile(r"HTTP Error|status", re.IGNORECASE)),
    ("timeout", re.compile(r"timed? ?out", re.IGNORECASE)),
    ("decode_error", re.compile(r"identify image|truncated|decod|cannot|broken|invalid|not a", re.IGNORECASE)),
    ("connection_error", re.compile(r"connect|refused|reset|resolve|URLError", re.IGNORECASE)),
)


def categorize(message: str) -> str:
    for name, pattern in _CATEGORIES:
        if pattern.search(message):
            return name
    return "other"


def summarize(split_dir: Path) -> dict:
    """Add up img2dataset's per-shard ``*_stats.json`` of one split."""
    total = Counter()
    errors: Counter[str] = Counter()
    raw_errors: Counter[str] = Counter()
    for stats_path in sorted(split_dir.glob("*_stats.json")):
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            total[k] += int(stats.get(k, 0))
        for msg, n in (stats.get("status_dict") or {}).items():
            if msg == "success":
                continue
            raw_errors[msg] += n
            errors[categorize(msg)] += n
    return {"urls": total["count"], "ok": total["successes"], "failed": total["count"] - total["successes"],
            "failed_to_download": total["failed_to_download"], "failed_to_resize": total["failed_to_resize"],
            "failures": dict(sorted(errors.items())), "messages": dict(raw_errors.most_common(20))}


def download(splits_dir: str | os.PathLike, out: str | os.PathLike, splits: Sequence[str] = ("train", "val"),
             processes: int = 1, threads: int = 32, timeout: int = 10, retries: int = 0, encode_format: str = "jpg",
             shard_size: int = 10000, progress: bool = True) -> dict:
    """Download ``splits_dir/{split}.csv`` (url,caption) into ``out/{split}`` and write ``out/download_report.json``."""
    splits_dir = Path(splits_dir)
    inputs = {s: splits_dir / f"{s}.csv" for s in splits}
    missing = [str(p) for p in inputs.values() if not p.is_file()]
    if missing:
        raise UserError(f"split file not found: {', '.join(missing)} (run `form_data clean` first)")
    rows = {s: len(read_split(p)) for s, p in inputs.items()}  # checks each header before img2dataset sees it
    if encode_format not in ("jpg", "png", "webp"):
        raise UserError(f"--encode-format must be jpg, png or webp, got {encode_format!r}")
    root = ensure_writable_dir(out)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home otherwise
    from img2dataset import download as img2dataset_download

    report = {"rules": {"max_side": MAX_SIDE, "max_aspect_ratio": MAX_ASPECT, "min_side": MIN_SIDE}, "splits": {}}
    for split, csv_path in inputs.items():
        if not rows[split]:
            report["splits"][split] = {"urls": 0, "ok": 0, "failed": 0, "failures": {}}
            continue
        img2dataset_download(
            url_list=str(csv_path), input_format="csv", url_col="url", caption_col="caption",
            output_folder=str(root / split), output_format="files", encode_format=encode_format,
            encode_quality=3 if encode_format == "png" else 95,  # png: zlib level; jpg/webp: quality
            image_size=MAX_SIDE, resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
            min_image_size=MIN_SIDE, max_aspect_ratio=MAX_ASPECT,
            processes_count=processes, thread_count=threads, timeout=timeout, retries=retries,
            number_sample_per_shard=shard_size, incremental_mode="incremental", enable_wandb=False,
            disallowed_header_directives=[], compute_hash=None, extract_exif=False,
        )
        if not any((root / split).glob("*_stats.json")):
            raise RuntimeError(f"img2dataset wrote no shard statistics for {split}; see its messages above")
        report["splits"][split] = summarize(root / split)
    write_json(root / "download_report.json", report)
    return report


def format_report(report: dict) -> str:
    lines = []
    for split, r in report["splits"].items():
        fails = ", ".join(f"{k} {v}" for k, v in r.get("failures", {}).items()) or "none"
        lines.append(f"{split}: {r['ok']}/{r['urls']} images downloaded; failures: {fails}")
    return "\n".join(lines)
