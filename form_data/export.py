"""Exports of downloaded splits into the formats the trainers read.

Input: ``ROOT/{split}/<shard>/<key>.json`` (+ the image next to it), as img2dataset's ``files`` output writes them (and
as ``form_data synth`` imitates). Output, every path relative to the file that lists it:

* ``{split}_clip.csv``   open_clip CSV: tab-separated, header ``title\\tfilepath``;
* ``{split}_dalle.jsonl`` DALLE: ``{"image_path": ..., "sentences": caption}``;
* ``{split}_brivl.jsonl`` BriVL: ``{"image_id": ..., "sentences": [["sur_text", caption]], "bbox": []}``;
* optionally ``wds/{split}-{i:05d}.tar`` webdataset shards (``key.<ext>`` + ``key.txt`` + ``key.json``).

Every file is rewritten whole (atomically) on each run, in key order: re-running never duplicates a line. Samples left
out (failed downloads, unreadable metadata, no image file, an image type the trainers do not read such as ``.gif``)
are counted by reason in ``export_report.json`` and in the returned counts' ``skipped``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import StagedFiles, ensure_writable_dir, read_jsonl, write_json, write_jsonl

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Sample:
    key: str
    image: Path
    caption: str
    url: str | None = None


def _one_line(text: str) -> str:
    """Captions go into TSV/JSONL lines: tabs and line breaks become spaces."""
    return " ".join(text.replace("\t", " ").splitlines()).strip()


class ExportCounts(dict):
    """Samples exported per split (a plain ``{split: n}`` dict), with ``skipped``: ``{split: {reason: n}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, dict[str, int]] = {}


def _other_image(meta_path: Path) -> str | None:
    """The suffix of a file beside the metadata that is no export format (e.g. ``.gif``), or None."""
    for p in sorted(meta_path.parent.glob(f"{glob.escape(meta_path.stem)}.*")):
        if p.suffix.lower() not in (".json", ".txt", *IMAGE_EXTS) and p.is_file():
            return p.suffix.lower()
    return None


def iter_downloaded(split_dir: str | os.PathLike, skipped: Counter | None = None) -> Iterator[Sample]:
    """Successful samples of one downloaded split, in key order; each sample left out is counted in ``skipped``
    by reason: ``unreadable_json``, ``failed_download`` (status not success), ``no_image``, ``unsupported_<ext>``,
    ``unreadable_caption`` (a ``.txt`` that is not UTF-8)."""
    split_dir = Path(split_dir)
    skipped = Counter() if skipped is None else skipped
    for meta_path in sorted(split_dir.glob("*/*.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            skipped["unreadable_json"] += 1
            continue
        if not isinstance(meta, dict):
            skipped["unreadable_json"] += 1
            continue
        if meta.get("status") != "success":
            skipped["failed_download"] += 1
            continue
        image = next((meta_path.with_suffix(ext) for ext in IMAGE_EXTS if meta_path.with_suffix(ext).is_file()), None)
        if image is None:
            other = _other_image(meta_path)
            skipped[f"unsupported_{other.lstrip('.')}" if other else "no_image"] += 1
            continue
        caption = meta.get("caption")
        if caption is None:
            txt = meta_path.with_suffix(".txt")
            try:
                caption = txt.read_text(encoding="utf-8") if txt.is_file() else ""
            except (OSError, UnicodeDecodeError):
                skipped["unreadable_caption"] += 1
                continue
        yield Sample(key=str(meta.get("key") or meta_path.stem), image=image, caption=_one_line(caption),
                     url=meta.get("url"))


def export(root: str | os.PathLike, out: str | os.PathLike | None = None, splits: Sequence[str] = ("train", "val"),
           webdataset: bool = False, shard_size: int = 10000, progress: bool = True,
           attributes: str | os.PathLike | None = None) -> ExportCounts:
    """Write the exports of ``ROOT/{split}`` into ``out`` (default: ``root``). Returns samples per split (and, in
    its ``skipped``, the samples left out per split and reason).

    ``attributes``: a JSONL of per-URL ground truth (``form_data synth --raw`` writes one); the downloaded samples'
    rows go to ``OUT/attributes.jsonl`` keyed by image path, as ``synth`` writes it for its own layout."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"download directory not found: {root}")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise UserError(f"{root} has none of the split folders {list(splits)} (run `form_data download` first)")
    out_dir = ensure_writable_dir(out or root)
    counts = ExportCounts()
    by_url = {row["url"]: row for row in read_jsonl(attributes) if "url" in row} if attributes else None
    attr_rows: list[dict] = []
    with StagedFiles() as staged:
        for split in present:
            skipped: Counter = Counter()
            samples = list(tqdm(iter_downloaded(root / split, skipped), desc=f"export {split}", unit="img",
                                disable=not progress))
            counts[split] = len(samples)
            counts.skipped[split] = dict(sorted(skipped.items()))

            def rel(p: Path) -> str:
                return Path(os.path.relpath(p.resolve(), out_dir.resolve())).as_posix()

            with open(staged.path(out_dir / f"{split}_clip.csv"), "w", encoding="utf-8", newline="") as f:
                f.write("title\tfilepath\n")
                f.writelines(f"{s.caption}\t{rel(s.image)}\n" for s in samples)
            with open(staged.path(out_dir / f"{split}_dalle.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"image_path": rel(s.image), "sentences": s.caption}, ensure_ascii=False)
                             + "\n" for s in samples)
            with open(staged.path(out_dir / f"{split}_brivl.jsonl"), "w", encoding="utf-8") as f:
                for s in samples:
                    row = {"image_id": rel(s.image), "sentences": [["sur_text", s.caption]], "bbox": []}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if webdataset:
                _write_shards(staged, out_dir / "wds", split, samples, shard_size)
            if by_url is not None:
                for s in samples:
                    row = by_url.get(s.url or "")
                    if row is not None:
                        attr_rows.append({**{k: v for k, v in row.items() if k not in ("url", "caption")},
                                          "filepath": rel(s.image), "split": split, "caption": s.caption})
        if not sum(counts.values()):
            left_out = Counter()
            for per_split in counts.skipped.values():
                left_out.update(per_split)
            why = ", ".join(f"{k} {n}" for k, n in sorted(left_out.items())) or "no samples"
            raise UserError(f"{root}: nothing to export: every sample was left out ({why})")
        if by_url is not None:
            write_jsonl(staged.path(out_dir / "attributes.jsonl"), attr_rows)
        write_json(staged.path(out_dir / "export_report.json"),
                   {"samples": dict(counts), "skipped": counts.skipped, "webdataset": webdataset})
        staged.commit()
    return counts


def _write_shards(staged: StagedFiles, wds_dir: Path, split: str, samples: list[Sample], shard_size: int) -> None:
    wds_dir.mkdir(parents=True, exist_ok=True)
    for old in wds_dir.glob(f"{split}-*.tar"):  # a re-run with fewer samples must not leave stale shards behind
        old.unlink()
    for start in range(0, max(len(samples), 1), shard_size):
        chunk = samples[start:start + shard_size]
        if not chunk:
            break
        with tarfile.open(staged.path(wds_dir / f"{split}-{start // shard_size:05d}.tar"), "w") as tar:
            for s in chunk:
                files = {s.image.suffix.lower(): s.image.read_bytes(), ".txt": s.caption.encode("utf-8"),
                         ".json": json.dumps({"key": s.key, "caption": s.caption}, ensure_ascii=False).encode()}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{s.key}{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
