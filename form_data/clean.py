"""Wukong-style caption cleaning: the seed notebook's rules, streamed over many CSV/parquet files.

Rules, in this order; a row is dropped by the first rule that hits (counts are per rule):

0. ``empty``       - the url or the caption is empty (nothing to download or to learn from);
1. ``too_long``    - ``len(caption) > 32`` code points;
2. ``bad_char``    - any Unicode decimal digit, full-width ``？【】《》`` or ASCII ``:?<>"``;
3. ``long_piece``  - split on ASCII ``;`` ``,`` and any whitespace, some piece is longer than 18;
4. ``no_keyword``  - no keyword of the keyword file occurs as a substring (skipped when no keyword file is given).

Then duplicate (url, caption) rows and duplicate urls are dropped (first one kept), the rest is shuffled with a seed
and split train/val.

Speed: rules 1-3 are vectorised Arrow compute kernels (RE2) over whole record batches; rule 4 runs ONE multi-pattern
scan (Hyperscan, or Aho-Corasick in Rust) over the UTF-8 buffer of a batch's surviving captions, so Python work grows
with the number of keyword hits, never with rows x keywords. The character classes are generated from Python's own
``str.isdecimal``/``str.isspace``, so the result is identical to the plain per-row Python rules (``row_verdict``
below, also the benchmark baseline).
"""

from __future__ import annotations

import csv
import io
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import ahocorasick_rs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import StagedFiles, ensure_writable_dir, reading, utf8_error, write_json

MAX_CAPTION_LEN = 32
MAX_PIECE_LEN = 18
BAD_PUNCT = "？【】《》" + ':?<>"'
RULES = ("empty", "too_long", "bad_char", "long_piece", "no_keyword")


# ---------------------------------------------------------------------------------------------------------------------
# Character classes, derived from Python's own definitions so that RE2 and `re` agree exactly.

def _ranges(pattern: str) -> list[tuple[int, int]]:
    """Code-point ranges of every character Python's ``re`` matches with ``pattern`` (a one-character class)."""
    every = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))
    out = []
    for m in re.finditer(pattern + "+", every):
        a, b = ord(m.group()[0]), ord(m.group()[-1])
        out.append((a, b))
    return out


def _re2_class(ranges: Iterable[tuple[int, int]], negate: bool = False) -> str:
    parts = "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges)
    return f"[{'^' if negate else ''}{parts}]"


@cache
def _classes() -> tuple[str, str]:
    """(RE2 pattern of a bad character, RE2 pattern of a run of more than MAX_PIECE_LEN non-separators)."""
    digits = _ranges(r"\d")  # Python re's \d on str patterns (Unicode category Nd)
    spaces = _ranges(r"\s")  # Python re's \s
    bad = sorted(digits + [(ord(c), ord(c)) for c in BAD_PUNCT])
    seps = sorted(spaces + [(ord(";"), ord(";")), (ord(","), ord(","))])
    return _re2_class(bad), _re2_class(seps, negate=True) + f"{{{MAX_PIECE_LEN + 1},}}"


# The same rules for one row in plain Python: the reference the vectorised path is tested (and benchmarked) against.
_BAD_RE = re.compile(r"[\d" + re.escape(BAD_PUNCT) + "]")
_SPLIT_RE = re.compile(r"[;,\s]")


def row_verdict(url: str, caption: str, keywords: Sequence[str] | set[str] | None, max_kw_len: int = 6) -> str:
    """Return the rule that drops this row, or ``"kept"``. The seed's per-row approach, windows longest first."""
    if not url or not caption:
        return "empty"
    if len(caption) > MAX_CAPTION_LEN:
        return "too_long"
    if _BAD_RE.search(caption):
        return "bad_char"
    if any(len(piece) > MAX_PIECE_LEN for piece in _SPLIT_RE.split(caption)):
        return "long_piece"
    if keywords is not None:
        kw = keywords if isinstance(keywords, (set, frozenset)) else set(keywords)
        n = len(caption)
        for width in range(min(max_kw_len, n), 0, -1):
            for i in range(n - width + 1):
                if caption[i:i + width] in kw:
                    return "kept"
        return "no_keyword"
    return "kept"


# ---------------------------------------------------------------------------------------------------------------------
# Keywords

def load_keywords(path: str | os.PathLike) -> list[str]:
    """One keyword per line, UTF-8 (BOM tolerated), CRLF tolerated, blank lines ignored, duplicates dropped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"keyword file not found: {p}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: not valid UTF-8") from None
    words = list(dict.fromkeys(w.strip() for w in text.splitlines() if w.strip()))
    if not words:
        raise UserError(f"keyword file {p} has no keywords")
    return words


# Keywords are searched in ONE buffer per batch: each text followed by this delimiter (one Arrow kernel). No keyword
# holds it, so no match runs from one text into the next; every match end is mapped back to its row by the offsets.
_DELIM = "\x00"


class CaptionRules:
    """The cleaning rules over Arrow batches: :meth:`apply` gives the keep-mask and the per-rule drop counts.

    Rule 1 is Arrow's ``utf8_length``; rules 2 and 3 are ONE RE2 pass (Arrow) over the survivors, and only the rows it
    hits are searched again to tell the two apart; rule 4 is one multi-pattern scan over the batch buffer, so Python
    work grows with the number of keyword matches, never with rows x keywords. Keyword engines, same answers:
    ``hyperscan`` (SIMD literal matching; the default where its wheel installs) or ``ahocorasick`` (Rust).
    """

    def __init__(self, keywords: Iterable[str] | None = None, engine: str = "auto"):
        self.keywords = None if keywords is None else sorted({w for w in keywords if w and _DELIM not in w})
        if self.keywords is not None and not self.keywords:
            raise UserError("no usable keywords")
        if engine == "auto":
            engine = "hyperscan" if _hyperscan() is not None else "ahocorasick"
        if engine not in ("hyperscan", "ahocorasick"):
            raise ValueError(f"unknown keyword engine {engine!r}")
        if engine == "hyperscan" and _hyperscan() is None:
            raise UserError("keyword engine 'hyperscan' asked for, but the hyperscan package is not installed")
        self.engine = engine
        encoded = [w.encode("utf-8") for w in self.keywords or ()]
        if encoded and engine == "hyperscan":
            hs = _hyperscan()
            self._db = hs.Database(mode=hs.HS_MODE_BLOCK)
            self._db.compile(expressions=encoded, ids=list(range(len(encoded))), literal=True)
            self._scratch = threading.local()  # a Hyperscan scratch space must not be shared between threads
        elif encoded:
            self._ac = ahocorasick_rs.BytesAhoCorasick(encoded,
                                                       implementation=ahocorasick_rs.Implementation.ContiguousNFA)

    def contains_keyword(self, texts: pa.Array | Sequence[str]) -> np.ndarray:
        """Boolean per text: does some keyword occur in it?"""
        texts = _as_strings(texts if isinstance(texts, pa.Array) else pa.array(list(texts), type=pa.string()))
        n = len(texts)
        out = np.zeros(n, dtype=bool)
        if n == 0:
            return out
        lines = pc.binary_join_element_wise(texts, "", _DELIM)
        _, offsets_buf, data_buf = lines.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int32)[: n + 1]
        data = data_buf.slice(0, int(offsets[-1]))
        if self.engine == "hyperscan":
            scratch = getattr(self._scratch, "s", None)
            if scratch is None:
                scratch = self._scratch.s = _hyperscan().Scratch(self._db)
            ends: list[int] = []
            add = ends.append
            self._db.scan(memoryview(data), match_event_handler=lambda _i, _f, to, _fl, _c: add(to), scratch=scratch)
        else:
            hits = self._ac.find_matches_as_indexes(np.frombuffer(data, dtype=np.uint8), overlapping=False)
            ends = [h[2] for h in hits]
        if ends:
            out[np.searchsorted(offsets, np.asarray(ends, dtype=np.int64), side="left") - 1] = True
        return out

    def apply(self, urls: pa.Array, captions: pa.Array) -> tuple[np.ndarray, dict[str, int]]:
        """Boolean keep-mask for one batch and the number of rows each rule dropped (first hitting rule only)."""
        bad_pat, piece_pat = _classes()
        urls, captions = _as_strings(urls), _as_strings(captions)
        n = len(captions)
        alive = np.ones(n, dtype=bool)
        counts: dict[str, int] = {}

        def drop(rule: str, rows: np.ndarray) -> None:
            hit = np.zeros(n, dtype=bool)
            hit[rows] = True
            hit &= alive
            counts[rule] = int(hit.sum())
            alive[hit] = False

        cap_len = _np(pc.utf8_length(captions))
        drop("empty", (_np(pc.binary_length(urls)) == 0) | (cap_len == 0))
        drop("too_long", cap_len > MAX_CAPTION_LEN)
        idx = np.flatnonzero(alive)
        either = idx[_np(pc.match_substring_regex(captions.take(idx), f"{bad_pat}|{piece_pat}")).astype(bool)]
        is_bad = _np(pc.match_substring_regex(captions.take(either), bad_pat)).astype(bool)
        drop("bad_char", either[is_bad])
        drop("long_piece", either[~is_bad])
        if self.keywords is not None:
            idx = np.flatnonzero(alive)
            drop("no_keyword", idx[~self.contains_keyword(captions.take(idx))])
        else:
            counts["no_keyword"] = 0
        return alive, counts

    def apply_parallel(self, urls: pa.Array, captions: pa.Array, workers: int = 1) -> tuple[np.ndarray, dict[str, int]]:
        """:meth:`apply` over ``workers`` slices in threads (Arrow's kernels release the GIL)."""
        n = len(captions)
        if workers <= 1 or n < 4096:
            return self.apply(urls, captions)
        step = -(-n // workers)
        parts = [(urls.slice(i, step), captions.slice(i, step)) for i in range(0, n, step)]
        results = list(_pool(workers).map(lambda p: self.apply(*p), parts))
        counts = {r: sum(c[r] for _, c in results) for r in results[0][1]}
        return np.concatenate([m for m, _ in results]), counts


@cache
def _hyperscan():
    try:
        import hyperscan
    except ImportError:
        return None
    return hyperscan


def _as_strings(a: pa.Array) -> pa.Array:
    if a.type != pa.string():
        a = a.cast(pa.string())
    return pc.fill_null(a, "") if a.null_count else a


def _np(a: pa.Array) -> np.ndarray:
    return a.to_numpy(zero_copy_only=False)


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="clean")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------------------------------
# Streaming input

def _column_ref(spec: str | int) -> str | int:
    return int(spec) if isinstance(spec, int) or str(spec).isdigit() else str(spec)


def _resolve(names: list[str], spec: str | int, what: str, path: Path) -> str:
    ref = _column_ref(spec)
    if isinstance(ref, int):
        if ref >= len(names):
            raise UserError(f"{path}: has {len(names)} column(s) {names}, no column number {ref} for the {what}")
        return names[ref]
    if ref not in names:
        raise UserError(
            f"{path}: no column {ref!r} for the {what}; columns found: {names} "
            f"(name the columns with --url-col/--caption-col, or give positions, e.g. --url-col 0 --caption-col 1)")
    return ref


def _csv_header(path: Path, delimiter: str) -> list[str]:
    with reading(path, "table"), pa.input_stream(str(path), compression="detect") as s:
        head = s.read(1 << 20)
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not merely a character cut at the 1 MiB boundary
            line = head[: e.start].count(b"\n") + 1
            raise UserError(f"{path}:{line}: not valid UTF-8") from None
        text = head[: e.start].decode("utf-8-sig")
    first = next(csv.reader(io.StringIO(text), delimiter=delimiter), None)
    if not first:
        raise UserError(f"{path}: empty file (no header line)")
    return first


def iter_batches(path: str | os.PathLike, url_col: str | int = "url", caption_col: str | int = "caption",
                 delimiter: str | None = None, batch_rows: int = 1 << 18) -> Iterator[tuple[pa.Array, pa.Array]]:
    """Yield (urls, captions) Arrow string arrays from one CSV(.gz)/TSV/parquet file, chunk by chunk."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    if path.suffix == ".parquet":
        try:
            pf = pq.ParquetFile(str(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        u, c = _resolve(names, url_col, "url", path), _resolve(names, caption_col, "caption", path)
        for rb in pf.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys([u, c]))):
            yield rb.column(u), rb.column(c)
        return
    if delimiter is None:
        delimiter = "\t" if path.suffix in (".tsv", ".txt") else ","
    names = _csv_header(path, delimiter)
    u, c = _resolve(names, url_col, "url", path), _resolve(names, caption_col, "caption", path)
    try:
        reader = pacsv.open_csv(
            pa.input_stream(str(path), compression="detect"),
            read_options=pacsv.ReadOptions(block_size=16 << 20, use_threads=True),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                             invalid_row_handler=lambda row: "skip"),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 include_columns=list(dict.fromkeys([u, c])),
                                                 strings_can_be_null=False),
        )
        buf_u: list[pa.Array] = []
        buf_c: list[pa.Array] = []
        held = 0
        for rb in reader:
            buf_u.append(rb.column(u))
            buf_c.append(rb.column(c))
            held += rb.num_rows
            if held >= batch_rows:
                yield pa.concat_arrays(buf_u), pa.concat_arrays(buf_c)
                buf_u, buf_c, held = [], [], 0
        if held:
            yield pa.concat_arrays(buf_u), pa.concat_arrays(buf_c)
    except pa.ArrowInvalid as e:
        if "UTF8" in str(e) or "utf8" in str(e) or "UTF-8" in str(e):
            raise utf8_error(path) from None
        raise UserError(f"{path}: cannot parse as CSV ({e})") from None
    except OSError as e:  # pyarrow's decompression errors: "Truncated compressed stream", "zlib inflate failed"
        raise UserError(f"{path}: corrupt or truncated table ({e})") from None


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; a directory stands for every .csv/.csv.gz/.tsv/.parquet inside it (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir()
                           if q.is_file() and (q.suffix in (".csv", ".tsv", ".parquet") or q.name.endswith(".csv.gz")))
            if not found:
                raise UserError(f"input directory {p} holds no .csv/.tsv/.parquet file")
            out.extend(found)
        elif not p.exists():
            raise UserError(f"input file not found: {p}")
        else:
            out.append(p)
    if not out:
        raise UserError("no input files given")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The whole cleaning run

@dataclass
class CleanReport:
    inputs: list[str]
    rows_in: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})
    dup_url_caption: int = 0
    dup_url: int = 0
    kept: int = 0
    train: int = 0
    val: int = 0
    seed: int = 0
    val_fraction: float = 0.1
    keywords: int | None = None

    def table(self) -> str:
        rows = [("rows in", self.rows_in)]
        rows += [(f"dropped: {r}", self.dropped[r]) for r in RULES]
        rows += [("dropped: duplicate (url, caption)", self.dup_url_caption), ("dropped: duplicate url", self.dup_url),
                 ("kept", self.kept), ("  train", self.train), ("  val", self.val)]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v:>12,}" for k, v in rows)


def clean(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, keywords: str | os.PathLike | None = None,
          url_col: str | int = "url", caption_col: str | int = "caption", delimiter: str | None = None,
          seed: int = 0, val_fraction: float = 0.1, batch_rows: int = 1 << 18, workers: int | None = None,
          progress: bool = True) -> CleanReport:
    """Clean, dedup, shuffle and split. Writes ``train.csv``, ``val.csv`` (url,caption) and ``clean_report.json``
    into ``out_dir``, all three at the end (a failed run leaves none of them)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = expand_inputs(inputs)
    out = ensure_writable_dir(out_dir)
    workers = workers or default_workers()
    rules = CaptionRules(load_keywords(keywords) if keywords else None)
    report = CleanReport(inputs=[str(f) for f in files], seed=seed, val_fraction=val_fraction,
                         keywords=len(rules.keywords) if rules.keywords is not None else None)
    seen_pairs: set[tuple[str, str]] = set()
    seen_urls: set[str] = set()
    kept_urls: list[str] = []
    kept_caps: list[str] = []
    for f in files:  # check every file's columns before reading any of them
        next(iter_batches(f, url_col, caption_col, delimiter, batch_rows=1), None)
    bar = tqdm(total=None, unit="row", desc="clean", disable=not progress, mininterval=0.5, delay=0.5)
    try:
        for f in files:
            for urls, caps in iter_batches(f, url_col, caption_col, delimiter, batch_rows):
                report.rows_in += len(urls)
                mask, counts = rules.apply_parallel(urls, caps, workers)
                for rule, k in counts.items():
                    report.dropped[rule] += k
                idx = pa.array(np.flatnonzero(mask))
                kept_u = pc.fill_null(urls, "").take(idx).to_pylist()
                kept_c = pc.fill_null(caps, "").take(idx).to_pylist()
                for u, c in zip(kept_u, kept_c, strict=True):
                    if (u, c) in seen_pairs:
                        report.dup_url_caption += 1
                    elif u in seen_urls:
                        seen_pairs.add((u, c))
                        report.dup_url += 1
                    else:
                        seen_pairs.add((u, c))
                        seen_urls.add(u)
                        kept_urls.append(u)
                        kept_caps.append(c)
                bar.update(len(urls))
        if report.rows_in == 0:
            raise UserError(f"no rows in input ({', '.join(report.inputs)})")
    except BaseException:
        bar.leave = False  # an error message must not share its line with a half-drawn bar
        raise
    finally:
        bar.close()
    report.kept = len(kept_urls)
    order = np.random.default_rng(seed).permutation(report.kept)
    n_train = report.kept - round(report.kept * val_fraction)
    splits = {"train": order[:n_train], "val": order[n_train:]}
    report.train, report.val = len(splits["train"]), len(splits["val"])
    with StagedFiles() as staged:
        for name, rows in splits.items():
            with open(staged.path(out / f"{name}.csv"), "w", encoding="utf-8", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["url", "caption"])
                w.writerows((kept_urls[i], kept_caps[i]) for i in rows)
        write_json(staged.path(out / "clean_report.json"), asdict(report))
        staged.commit()
    return report


def read_split(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a split written by :func:`clean` (header ``url,caption``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"split file not found: {p}")
    with reading(p, "split file"), open(p, encoding="utf-8", newline="") as fh:
        r = csv.reader(fh)
        header = next(r, None)
        if header != ["url", "caption"]:
            raise UserError(f"{p}: expected header url,caption, found {header}")
        return [(row[0], row[1]) for row in r if len(row) >= 2]
