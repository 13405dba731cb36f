"""Image-caption datasets over the formats that ``form_data export`` writes, all yielding the same sample dict.

Every dataset item is ``{"image": FloatTensor[3, H, W] in [0, 1], "caption": str, "index": int, "skipped": int}``;
:func:`collate` stacks a list of them into ``{"image": [B, 3, H, W], "caption": list[str], "index": LongTensor[B],
"skipped": int}``.

Formats (every image path inside a listing is resolved relative to the directory of the listing file):

- :class:`CsvImageText`      - open_clip CSV, tab-separated, header ``title<TAB>filepath`` (names configurable);
- :class:`JsonlImageText`    - DALLE JSONL ``{"image_path", "sentences"}`` or BriVL JSONL ``{"image_id", "sentences":
  [["sur_text", caption], ...]}``, told apart by their keys;
- :class:`JsonImageList`      - a JSON list of image paths (Styled-VQ's original format; no captions);
- :class:`ImageFolderDataset` - every image under a folder, caption from a sibling ``<stem>.txt`` (else ``""``);
- :class:`WebDatasetShards`  - webdataset tar shards (``KEY.jpg`` + ``KEY.txt`` [+ ``KEY.json``]), read with
  ``tarfile``.

:func:`open_dataset` picks the class from a path.

Broken images (corrupt, truncated, empty, not an image, decompression bombs) never crash a run. A map-style dataset
asked for index ``i`` falls through to ``i+1, i+2, ...`` (wrapping around) until an image loads, and reports how many
files it passed over in the sample's ``skipped``; :class:`WebDatasetShards` drops the broken sample and adds it to the
``skipped`` of the next sample it yields. Because the count travels with the samples it survives DataLoader worker
processes: sum ``batch["skipped"]`` to count the broken files met. Each broken path is also logged once per process and
kept in the dataset's ``broken`` set (per process: a worker's set is not seen by the main process).
Evaluations read rows without fall-through instead (:meth:`_ListedImages.row`, :class:`StrictRows`): a broken row is
left out, not replaced by its neighbour. A listing with no readable image at all is refused when it is opened
(:class:`NoReadableImage`, a UserError).

Map-style listings read through the default (deterministic) transform are decoded once into an :class:`ImageCache`
that later runs over the same listing reuse.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import os
import random
import re
import signal
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import read_jsonl, utf8_error

__all__ = [
    "IMAGE_EXTENSIONS",
    "CsvImageText",
    "ImageFolderDataset",
    "JsonlImageText",
    "NoReadableImage",
    "StrictRows",
    "PipeFailed",
    "WebDatasetShards",
    "braceexpand",
    "collate",
    "collate_rows",
    "default_transform",
    "expand_shards",
    "is_shard_url",
    "load_image",
    "open_dataset",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset member extensions, in order of preference

Sample = dict  # {"image": Tensor, "caption": str, "index": int, "skipped": int}
Transform = Callable[[Image.Image], torch.Tensor]

# What PIL and the OS raise for bad image data. Anything else (TypeError, AttributeError, ...) is a bug and propagates.
BAD_IMAGE_ERRORS = (
    OSError,  # includes UnidentifiedImageError, "image file is truncated", missing files, zero-byte files
    UnidentifiedImageError,
    ValueError,
    SyntaxError,  # some plugins report malformed headers this way
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    zlib.error,
    Image.DecompressionBombError,  # not an OSError
)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview) -> Image.Image | None:
    """Open and fully decode an image from a path or raw bytes; an RGB image, or None if it cannot be read.

    Modes that have an RGB meaning are converted: L/1/P/CMYK/YCbCr directly, anything with alpha (RGBA, LA, PA, or a
    palette/grayscale with a transparency entry) composited on white, and high-depth grayscale (I;16*, I, F) scaled
    to 8 bits (see :func:`_to_8bit`). An EXIF Orientation tag is applied (a phone photo stored sideways comes out
    upright; a malformed EXIF block is ignored). Corrupt, truncated, empty, non-image and decompression-bomb files
    give None.
    """
    try:
        fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
        with Image.open(fp) as img:
            img.load()
            return _to_rgb(_upright(img))
    except BAD_IMAGE_ERRORS:
        return None


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF Orientation says; ``img`` itself when it has none or the EXIF cannot be parsed."""
    try:
        return ImageOps.exif_transpose(img)
    except BAD_IMAGE_ERRORS:  # Pillow's EXIF parser raises several kinds on malformed tags
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _to_8bit(img)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-depth grayscale -> 8-bit ``L``, scaled by the range the pixel format (or the data) actually uses.

    I;16* (16-bit): divided by 257 (65535 -> 255). ``I`` (32-bit int): by the smallest of 8/16/32 bits holding the
    data's maximum (16-bit PNGs often open as ``I``). ``F``: ``[0, 1]`` data times 255, ``[0, 255]`` kept. Data outside
    those ranges (negative values, larger floats) is stretched min..max to 0..255.
    """
    a = np.asarray(img, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        scale, offset = 255.0 / 65535.0, 0.0
    elif lo >= 0 and img.mode == "F" and hi <= 1.0:
        scale, offset = 255.0, 0.0
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif lo >= 0 and hi <= 65535 and img.mode != "F":
        scale, offset = 255.0 / 65535.0, 0.0
    else:
        scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo
    out = np.clip(np.rint((a - offset) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


class ResizeCenterCrop:
    """PIL RGB image -> FloatTensor[3, size, size] in [0, 1]: the shorter side resized to ``size`` (bicubic; PIL
    antialiases when it shrinks), then the centre crop. The same pixels as torchvision's
    ``Compose([Resize(size, BICUBIC, antialias=True), CenterCrop(size), ToTensor()])`` on a PIL image, without importing
    torchvision (seconds of start-up for every command). Deterministic, so its outputs can be cached
    (:class:`ImageCache`)."""

    def __init__(self, size: int):
        self.size = size

    def pil(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s = self.size
        if (w, h) != (s, s):
            if w <= h:
                nw, nh = s, int(s * h / w)
            else:
                nw, nh = int(s * w / h), s
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.BICUBIC)
            left, top = round((nw - s) / 2.0), round((nh - s) / 2.0)
            img = img.crop((left, top, left + s, top + s))
        return img

    def uint8(self, img: Image.Image) -> torch.Tensor:
        """uint8 [3, size, size]."""
        return torch.from_numpy(np.array(self.pil(img), dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.uint8(img).float().div_(255)

    def __repr__(self) -> str:
        return f"ResizeCenterCrop({self.size})"


def default_transform(image_size: int, random_crop: bool = False) -> Transform:
    """PIL RGB image -> FloatTensor[3, image_size, image_size] in [0, 1].

    Default: :class:`ResizeCenterCrop` (shorter side to ``image_size``, bicubic, antialiased, then the centre crop).
    With ``random_crop``: ``RandomResizedCrop(image_size, scale=(0.75, 1.0), ratio=(1, 1))`` on the decoded image, as
    the seed's DALLE training did (it crops the full-resolution image, so the crop is resampled only once).
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if random_crop:
        from torchvision import transforms as T  # only here: importing torchvision costs seconds

        bicubic = T.InterpolationMode.BICUBIC
        crop = T.RandomResizedCrop(image_size, scale=(0.75, 1.0), ratio=(1.0, 1.0), interpolation=bicubic,
                                   antialias=True)
        return T.Compose([crop, T.ToTensor()])
    return ResizeCenterCrop(image_size)


def collate(batch: Sequence[Sample]) -> dict:
    """Samples -> ``{"image": [B,3,H,W], "caption": list[str], "index": LongTensor[B], "skipped": int}``."""
    return {
        "image": torch.stack([s["image"] for s in batch]),
        "caption": [s["caption"] for s in batch],
        "index": torch.tensor([int(s["index"]) for s in batch], dtype=torch.long),
        "skipped": sum(int(s["skipped"]) for s in batch),
    }


_warned: set[str] = set()  # broken paths already logged by this process


def _note_broken(broken: set[str], path: str, why: str = "unreadable image") -> None:
    broken.add(path)
    if path not in _warned:
        _warned.add(path)
        log.warning("skipping %s: %s", path, why)


# ---------------------------------------------------------------------------------------------------------------------
# Map-style datasets


class NoReadableImage(UserError):
    """A listing in which not one image can be read: nothing to train on or evaluate (one line, exit 2)."""


class _Strings:
    """A read-only list of strings packed into one numpy buffer.

    DataLoader workers touching millions of small Python objects copy every page they sit on (reference counts), so
    listings are kept as two arrays instead; they also pickle fast to spawned workers.
    """

    def __init__(self, items: Iterable[str]):
        encoded = [s.encode("utf-8", errors="surrogateescape") for s in items]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._data[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8", errors="surrogateescape")


class _ListedImages(Dataset):
    """Base of the map-style datasets: image paths relative to ``root`` (+ captions); falls through broken images."""

    def __init__(self, root: Path, paths: Sequence[str], captions: Sequence[str] | None, source: str,
                 transform: Transform | None, image_size: int, cache: bool = True):
        if not paths:
            raise UserError(f"{source}: no images listed")
        self.root = str(root)
        self.source = source
        self.transform = transform if transform is not None else default_transform(image_size)
        self.broken: set[str] = set()
        self._paths = _Strings(paths)
        self._captions = _Strings(captions) if captions is not None else None
        self._check_some_exist()
        self._cache: ImageCache | None = None
        if cache and isinstance(self.transform, ResizeCenterCrop) and ImageCache.fits(len(self), self.transform.size):
            self._cache = ImageCache.open(self, self.transform)
        self._check_some_readable()

    def _check_some_exist(self, probe: int = 16) -> None:
        # Paths resolved against the wrong directory would otherwise only show as "no readable image" much later.
        first = [self.image_path(i) for i in range(min(probe, len(self)))]
        if not any(os.path.exists(p) for p in first):
            raise UserError(f"{self.source}: none of the first {len(first)} listed images exists, e.g. {first[0]} "
                            f"(image paths are resolved relative to {self.root})")

    def _check_some_readable(self) -> None:
        # A listing of nothing but broken files would otherwise fail at its first item, often inside a DataLoader
        # worker (a traceback). Cached: free; else decodes up to the first readable image (one for a sound listing).
        if self._cache is not None:
            if bool(self._cache.ok.any()):
                self._warn_broken()
                return
        else:
            for i in range(len(self)):
                if load_image(self.image_path(i)) is not None:
                    for j in range(i):
                        _note_broken(self.broken, self.image_path(j))
                    return
        # no warning per file here: the one-line error says it all
        raise NoReadableImage(f"{self.source}: no readable image among its {len(self)} listed files (each is "
                              f"missing, empty, corrupt or not an image), e.g. {self.image_path(0)}")

    def _warn_broken(self) -> None:
        for path in sorted(self.broken):  # the holes the image cache found, logged once the listing is known usable
            _note_broken(self.broken, path)

    def __len__(self) -> int:
        return len(self._paths)

    def image_path(self, i: int) -> str:
        return os.path.join(self.root, self._paths[i])

    def caption(self, i: int) -> str:
        return self._captions[i] if self._captions is not None else ""

    def __getitem__(self, i: int) -> Sample:
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        if self._cache is not None:
            j, skipped = self._cache.source(i)
            if j >= 0:
                return {"image": self._cache.image(j), "caption": self.caption(j), "index": j, "skipped": skipped}
        skipped = 0
        for k in range(n):  # the listing holds a readable image (checked when opened): falls through any broken run
            j = (i + k) % n
            path = self.image_path(j)
            img = load_image(path)
            if img is not None:
                return {"image": self.transform(img), "caption": self.caption(j), "index": j, "skipped": skipped}
            _note_broken(self.broken, path)
            skipped += 1
        raise NoReadableImage(f"{self.source}: no readable image left among its {n} files (were they changed "
                              f"while it was read?)")

    def row(self, i: int) -> Sample | None:
        """Item ``i`` itself, or None when its image is broken: no fall-through to a neighbour. For evaluations,
        which must neither count a neighbour's image twice nor pair it with row ``i``'s caption or file name."""
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        if self._cache is not None:
            if not bool(self._cache.ok[i]):
                return None
            return {"image": self._cache.image(i), "caption": self.caption(i), "index": i, "skipped": 0}
        path = self.image_path(i)
        img = load_image(path)
        if img is None:
            _note_broken(self.broken, path)
            return None
        return {"image": self.transform(img), "caption": self.caption(i), "index": i, "skipped": 0}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} samples)"


class StrictRows(Dataset):
    """A map-style data set read row by row without fall-through: item ``i`` is ``(i, sample)``, or ``(i, None)``
    when row ``i``'s image is broken. Batch with :func:`collate_rows`. Uses the data set's ``row(i)`` where it has
    one, else keeps ``ds[i]`` only when it is row ``i`` itself."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, Sample | None]:
        if hasattr(self.ds, "row"):
            return i, self.ds.row(i)
        item = self.ds[i]
        return i, (item if int(item["index"]) == i else None)


def collate_rows(items: Sequence[tuple[int, Sample | None]]) -> tuple[dict | None, list[int]]:
    """:class:`StrictRows` items -> (:func:`collate` of the readable samples or None when there are none, the row
    indices whose image is broken)."""
    good = [s for _, s in items if s is not None]
    return (collate(good) if good else None), [i for i, s in items if s is None]


class ImageCache:
    """Every image of a listing decoded ONCE through a deterministic :class:`ResizeCenterCrop`, kept as one uint8
    tensor [N, 3, S, S] in a file beside the listing (``.cache/<listing>-<S>px-<digest>.pt``), which every later run
    over the same listing (trainers, tokenize, eval) reads instead of decoding images again: 2,750 64-px images are
    34 MB. The digest covers the listing and every image file's size and mtime, so an edited file is decoded anew
    (and the listing's older cache at that side is removed).
    Listings whose cache would exceed :attr:`MAX_BYTES` are read from the files as before; where the folder is not
    writable the cache lives in memory only. A broken file is stored as a hole and indexes fall through it exactly as
    the uncached dataset does (same ``index`` and ``skipped``)."""

    MAX_BYTES = 512 * 2**20
    VERSION = 2  # 2: EXIF orientation applied

    def __init__(self, images: torch.Tensor, ok: torch.Tensor):
        self.images, self.ok = images, ok
        n = len(ok)
        src = torch.full((n,), -1, dtype=torch.long)
        skipped = torch.zeros(n, dtype=torch.long)
        good = ok.nonzero().flatten().tolist()
        if good:
            nxt = good[0] + n  # the next readable index at or after i, wrapping around
            for i in range(n - 1, -1, -1):
                if ok[i]:
                    nxt = i
                gap = nxt - i
                src[i], skipped[i] = nxt % n, gap
        self._src, self._skipped = src, skipped

    @classmethod
    def fits(cls, n: int, size: int) -> bool:
        return n * 3 * size * size <= cls.MAX_BYTES

    def source(self, i: int) -> tuple[int, int]:
        """(index of the image that item ``i`` yields or -1 when the listing has none, files passed over)."""
        return int(self._src[i]), int(self._skipped[i])

    def image(self, j: int) -> torch.Tensor:
        return self.images[j].float().div_(255)

    @staticmethod
    def _digest(ds: _ListedImages, size: int) -> str:
        import hashlib

        h = hashlib.sha1(f"{ImageCache.VERSION}|{size}|{os.path.abspath(ds.source)}".encode())
        for i in range(len(ds)):
            path = ds.image_path(i)
            try:
                st = os.stat(path)
                h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                h.update(f"{path}|missing\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]

    @classmethod
    def open(cls, ds: _ListedImages, transform: ResizeCenterCrop) -> ImageCache:
        from zh_t2i_base.fileio import atomic_path

        size = transform.size
        src = Path(ds.source)
        folder = (src.parent if src.is_file() else src) / ".cache"
        path = folder / f"{src.name}-{size}px-{cls._digest(ds, size)}.pt"
        if path.is_file():
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
                if obj["images"].shape == (len(ds), 3, size, size) and obj["ok"].shape == (len(ds),):
                    return cls(obj["images"], obj["ok"])
            except Exception as e:  # noqa: BLE001  (a torn or foreign cache file, whatever torch.load says: decode again)
                log.warning("ignoring image cache %s (%s)", path, e)
        images = torch.zeros(len(ds), 3, size, size, dtype=torch.uint8)
        ok = torch.zeros(len(ds), dtype=torch.bool)

        def decode(i: int) -> None:
            img = load_image(ds.image_path(i))
            if img is None:
                ds.broken.add(ds.image_path(i))  # logged by the listing once it knows some image is readable
            else:
                images[i], ok[i] = transform.uint8(img), True

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            list(tqdm(pool.map(decode, range(len(ds))), total=len(ds), desc=f"decoding {src.name} once",
                      unit="img", leave=False, disable=len(ds) < 256))
        try:
            folder.mkdir(exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"images": images, "ok": ok}, tmp)
            for stale in folder.glob(f"{glob.escape(src.name)}-{size}px-*.pt"):  # the listing's caches before an edit
                if stale != path:
                    stale.unlink(missing_ok=True)
        except OSError as e:
            log.info("image cache kept in memory only (%s: %s)", folder, e)
        return cls(images, ok)


def _listing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such file: {p}")
    return p


class CsvImageText(_ListedImages):
    """open_clip-style CSV (tab-separated by default) with an image-path column and a caption column."""

    def __init__(self, path: str | os.PathLike, img_key: str = "filepath", caption_key: str = "title",
                 sep: str = "\t", transform: Transform | None = None, image_size: int = 256, cache: bool = True):
        p = _listing(path)
        paths, captions = [], []
        try:
            with open(p, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f, delimiter=sep)
                header = next(reader, None)
                if header is None:
                    raise UserError(f"{p}: empty file, expected a header with columns {img_key!r} and {caption_key!r}")
                missing = [k for k in (img_key, caption_key) if k not in header]
                if missing:
                    hint = f" - is the separator {sep!r} right?" if len(header) == 1 else ""
                    raise UserError(f"{p}: no column {' or '.join(map(repr, missing))}; "
                                    f"found columns: {', '.join(map(repr, header))}{hint}")
                ii, ci = header.index(img_key), header.index(caption_key)
                need = max(ii, ci) + 1
                for row in reader:
                    if not row:
                        continue
                    if len(row) < need:
                        raise UserError(f"{p}:{reader.line_num}: {len(row)} columns, expected at least {need}")
                    paths.append(row[ii])
                    captions.append(row[ci])
        except UnicodeDecodeError:
            raise utf8_error(p) from None
        except csv.Error as e:
            raise UserError(f"{p}: malformed CSV ({e})") from None
        super().__init__(p.parent, paths, captions, str(p), transform, image_size, cache)


def _first_text(sentences: object) -> str:
    """DALLE ``sentences``: a string, or a list whose first string is used."""
    if isinstance(sentences, (list, tuple)):
        return str(sentences[0]) if sentences else ""
    return "" if sentences is None else str(sentences)


def _brivl_text(sentences: object) -> str:
    """BriVL ``sentences``: ``[[tag, text], ...]`` -> the ``sur_text`` text, else the first text."""
    if not isinstance(sentences, (list, tuple)):
        return _first_text(sentences)
    for s in sentences:
        if isinstance(s, (list, tuple)) and len(s) >= 2 and s[0] == "sur_text":
            return str(s[1])
    if not sentences:
        return ""
    first = sentences[0]
    if isinstance(first, (list, tuple)):
        return str(first[1] if len(first) > 1 else first[0]) if first else ""
    return str(first)


class JsonlImageText(_ListedImages):
    """DALLE JSONL (``image_path`` + ``sentences``) or BriVL JSONL (``image_id`` + ``sentences``), auto-detected."""

    LAYOUTS: ClassVar[dict[str, tuple[str, Callable[[object], str]]]] = {
        "image_path": ("dalle", _first_text), "image_id": ("brivl", _brivl_text)}

    def __init__(self, path: str | os.PathLike, transform: Transform | None = None, image_size: int = 256,
                 cache: bool = True):
        p = _listing(path)
        rows = read_jsonl(p)
        if not rows:
            raise UserError(f"{p}: no images listed")
        first = rows[0] if isinstance(rows[0], dict) else {}
        key = next((k for k in self.LAYOUTS if k in first), None)
        if key is None:
            raise UserError(f"{p}: row 1 has neither 'image_path' (DALLE) nor 'image_id' (BriVL); "
                            f"found keys: {', '.join(map(repr, first)) or 'none'}")
        self.layout, text = self.LAYOUTS[key]
        paths, captions = [], []
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict) or key not in row or "sentences" not in row:
                found = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{p}: row {n} lacks {key!r} or 'sentences' ({self.layout} layout); found: {found}")
            paths.append(str(row[key]))
            captions.append(text(row["sentences"]))
        super().__init__(p.parent, paths, captions, str(p), transform, image_size, cache)


class JsonImageList(_ListedImages):
    """Styled-VQ's original training data format: a JSON file holding a flat list of image paths (absolute, or
    relative to the file's directory). Captions are empty."""

    def __init__(self, path: str | os.PathLike, transform=None, image_size: int = 256):
        p = _listing(path)
        try:
            paths = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise utf8_error(p) from None
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
            raise UserError(f"{p}: expected a JSON list of image paths")
        super().__init__(p.parent, paths, None, str(p), transform, image_size)


class ImageFolderDataset(_ListedImages):
    """Every image file under ``root`` (recursive, sorted); caption = the sibling ``<stem>.txt`` if present, else ""."""

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, image_size: int = 256,
                 cache: bool = True):
        r = Path(root)
        if not r.is_dir():
            raise UserError(f"no such directory: {r}")
        rel = (p.relative_to(r) for p in r.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths = sorted(str(p) for p in rel if not any(part.startswith(".") for part in p.parts))  # skip hidden
        if not paths:
            raise UserError(f"{r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under it")
        super().__init__(r, paths, None, str(r), transform, image_size, cache)

    def caption(self, i: int) -> str:
        txt = os.path.splitext(self.image_path(i))[0] + ".txt"
        try:
            with open(txt, encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except OSError:
            return ""


# ---------------------------------------------------------------------------------------------------------------------
# webdataset shards

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_GROUP = re.compile(r"\{(\d+\.\.\d+|[^{}]*,[^{}]*)\}")  # {000..009} or {a,b,c}, as braceexpand


def braceexpand(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar`` (zero padding kept from the lower bound), and
    ``{x,y}`` lists, every group expanded in turn (webdataset's ``braceexpand``; no nesting). Other braces (an awk
    ``'{print}'`` in a ``pipe:`` command) stay as they are."""
    m = _BRACE_GROUP.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = _BRACES.fullmatch("{" + body + "}")
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        step = 1 if hi >= lo else -1
        items = [f"{n:0{width}d}" for n in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [head + item + rest for item in items for rest in braceexpand(tail)]


def is_pipe_url(s: str | os.PathLike) -> bool:
    return isinstance(s, str) and s.startswith("pipe:")


def is_shard_url(s: str | os.PathLike) -> bool:
    """True for what only names shards and is no single local path: a ``pipe:`` URL, a ``::`` list, a brace
    pattern or a glob (:func:`expand_shards` resolves and checks it)."""
    s = os.fspath(s)
    return is_pipe_url(s) or "::" in s or _BRACE_GROUP.search(s) is not None or glob.has_magic(s)


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from a list, ``a::b`` (open_clip's separator), a directory (its ``*.tar``), a glob, a brace range
    ``shard-{000..009}.tar`` or list ``{a,b}``, or ``pipe:CMD`` (the tar stream is CMD's stdout; braces in CMD are
    expanded too: ``pipe:aws s3 cp s3://bucket/{00000..09999}.tar -``). Local shards must exist."""
    if isinstance(spec, (list, tuple)):
        out = [s for item in spec for s in expand_shards(item)]
        if not out:
            raise UserError("no shards given")
        return out
    s = os.fspath(spec)
    if "::" in s:
        return expand_shards([part for part in s.split("::") if part.strip()])
    expanded = braceexpand(s)
    if expanded != [s]:
        return expand_shards(expanded)
    if is_pipe_url(s):
        if not s[len("pipe:"):].strip():
            raise UserError(f"{s!r}: a pipe: URL needs a command (pipe:CMD, CMD writing the tar to its stdout)")
        return [s]
    if os.path.isdir(s):
        out = sorted(glob.glob(os.path.join(glob.escape(s), "*.tar")))
        if not out:
            raise UserError(f"{s}: no .tar shards in this directory")
        return out
    if glob.has_magic(s):
        out = sorted(p for p in glob.glob(s) if os.path.isfile(p))
        if not out:
            raise UserError(f"no shards match {s}")
        return out
    if not os.path.isfile(s):
        raise UserError(f"no such shard: {s}")
    return [s]


def _split_key(name: str) -> tuple[str, str] | None:
    """webdataset convention: ``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``); names without one give None."""
    head, base = os.path.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


class PipeFailed(UserError):
    """A ``pipe:`` shard's command exited with a non-zero status (or could not be started)."""


@contextlib.contextmanager
def _open_shard(url: str) -> Iterator[tarfile.TarFile]:
    """A streaming tar reader of a local shard, or of a ``pipe:CMD`` URL's command output (run by the shell).

    The command's exit status is checked once its stream was read to the end: a failure raises :class:`PipeFailed`
    naming the URL and the end of the command's stderr. A stream given up early (the trainer stopped) kills it.
    """
    if not is_pipe_url(url):
        with tarfile.open(url, "r|*") as tar:
            yield tar
        return
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=err,
                                    bufsize=1 << 20, start_new_session=True)  # its own group: killed as one
        except OSError as e:
            raise PipeFailed(f"{url}: cannot run the command: {e.strerror or e}") from None
        damaged = None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                yield tar
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            damaged = e  # if the command failed, that is the error to show
        except BaseException:  # given up early (GeneratorExit) or failed elsewhere: stop the command
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.stdout.close()
            proc.wait()
            raise
        with contextlib.suppress(OSError):  # read to its end: a command cut off by a closed pipe fails
            while proc.stdout.read(1 << 16):
                pass
        proc.stdout.close()
        code = proc.wait()
        if code != 0:
            err.seek(0)
            tail = " ".join(err.read()[-400:].decode("utf-8", errors="replace").split())
            raise PipeFailed(f"{url}: the command exited with status {code}" + (f": {tail}" if tail else ""))
        if damaged is not None:
            raise damaged


def _iter_tar(path: str) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: bytes}) per sample of a shard, streaming; only image and ``txt`` members are read.

    A missing or damaged shard ends its stream with a warning instead of an exception; a ``pipe:`` command that fails
    raises :class:`PipeFailed`.
    """
    key, files, n = None, {}, 0
    try:
        with _open_shard(path) as tar:
            for member in tar:
                split = _split_key(member.name) if member.isfile() else None
                if split is None:
                    continue
                k, ext = split
                if k != key:
                    if files:
                        yield key, files
                        n += 1
                    key, files = k, {}
                wanted = ext == "txt" or ext in SHARD_IMAGE_EXTENSIONS
                f = tar.extractfile(member) if wanted else None
                files[ext] = f.read() if f is not None else None
        if files:
            yield key, files
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        log.warning("shard %s unreadable after %d samples, going on with the next one: %s", path, n, e)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    # DataLoader workers started with spawn/forkserver see no process group, but inherit torchrun's environment.
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class WebDatasetShards(IterableDataset):
    """Samples of webdataset tar shards (local files or ``pipe:CMD`` URLs, see :func:`expand_shards`), streamed by
    each reader: one reader per (DDP rank, DataLoader worker).

    How readers get their shards:

    - default: dealt round-robin to reader ``rank * num_workers + worker_id``; with ``shuffle_shards`` the shard order
      is first permuted with ``seed + epoch`` (the same permutation on every rank, see :meth:`set_epoch`). Finite:
      each reader reads its shards once, so readers with more data yield more samples (any number of shards works;
      under DDP, only the trainer's cut at ``--train-num-samples`` keeps ranks in step). With ``repeat`` (set by
      :meth:`configure_stream`) a reader goes round its shards again and again, and a reader left without a shard
      (fewer shards than readers) reads shard ``reader mod len(shards)``;
    - ``resampled`` (open_clip's ``--dataset-resampled``): each reader draws shards WITH replacement, from a
      ``random.Random`` seeded with (seed, epoch, rank, worker): deterministic, different for every reader and epoch,
      endless (the consumer decides when an epoch ends). Any number of shards, any number of readers.

    ``shuffle_buffer`` > 0 mixes the samples of a reader in a buffer of that many (undecoded) samples, drawn with the
    same reader RNG. ``rank`` and ``world_size`` default to torch.distributed's (or torchrun's RANK/WORLD_SIZE).

    ``index`` is the sample key as a number when the key's file name is all digits (as ``export`` writes), else -1.
    A broken or image-less sample is dropped and counted in the ``skipped`` of the next sample yielded by the same
    worker (the count of trailing broken samples of a worker is lost, there is no sample left to carry it).
    """

    def __init__(self, urls_or_glob: str | os.PathLike | Sequence[str | os.PathLike],
                 transform: Transform | None = None, image_size: int = 256, shuffle_shards: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, resampled: bool = False,
                 repeat: bool = False, shuffle_buffer: int = 0):
        self.shards = expand_shards(urls_or_glob)
        self.transform = transform if transform is not None else default_transform(image_size)
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch, self.skip_batches, self.batch_size = 0, 0, 1
        self.rank, self.world_size = rank, world_size
        self.resampled, self.repeat, self.shuffle_buffer = resampled, repeat, shuffle_buffer
        self.broken: set[str] = set()

    def configure_stream(self, *, seed: int, shuffle: bool, resampled: bool) -> None:
        """What the trainer sets for an endless training stream (``--dataset-resampled``, ``--seed``)."""
        self.seed, self.shuffle_shards, self.resampled, self.repeat = seed, shuffle, resampled, True

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        """Use another shard permutation / other resampling draws; call before creating the epoch's iterator.

        ``skip_batches`` (a resumed epoch: batches of ``batch_size`` the DataLoader already delivered, dealt
        round-robin over its workers) makes a default-mode reader pass over the samples those batches held (read, not
        decoded: exact unless broken samples were among them), and a resampled reader draw afresh (its seed then
        includes ``skip_batches``; the samples of the finished batches are not replayed)."""
        self.epoch, self.skip_batches, self.batch_size = epoch, skip_batches, batch_size

    def reader(self) -> tuple[int, int, int, int]:
        """(rank, world_size, worker, num_workers) of the calling process."""
        rank, world = _rank_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, worker, workers

    def reader_rng(self) -> random.Random:
        """The RNG of this reader: a function of (seed, epoch, rank, worker) (and of a resumed epoch's start)."""
        rank, _, worker, _ = self.reader()
        key = f"{self.seed}/{self.epoch}/{rank}/{worker}"
        return random.Random(key + (f"/{self.skip_batches}" if self.resampled and self.skip_batches else ""))

    def my_shards(self) -> list[str]:
        """The shards this (rank, worker) reads in default mode (resampled readers draw from all of them)."""
        rank, world, worker, workers = self.reader()
        shards = list(self.shards)
        if self.shuffle_shards:
            random.Random(self.seed + self.epoch).shuffle(shards)
        consumers = world * workers
        reader = rank * workers + worker
        if len(shards) < consumers and rank == 0 and worker == 0:
            log.warning("%d shards for %d readers (%d ranks x %d workers): %s", len(shards), consumers, world,
                        workers, "some read a shard another reads too" if self.repeat else "some read nothing")
        mine = shards[reader::consumers]
        return mine or ([shards[reader % len(shards)]] if self.repeat else [])

    def _shard_order(self, rng: random.Random) -> Iterator[str]:
        if self.resampled:
            while True:
                yield rng.choice(self.shards)
        mine = self.my_shards()
        while True:
            yield from mine
            if not self.repeat:
                return

    def _records(self) -> Iterator[tuple[str, str, dict[str, bytes | None]]]:
        rng = self.reader_rng()
        records = self._read(self._shard_order(rng))
        if self.shuffle_buffer > 0:
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        return records

    def _read(self, shards: Iterable[str]) -> Iterator[tuple[str, str, dict[str, bytes | None]]]:
        empty = 0  # shards in a row that gave nothing: an endless stream of them would never yield
        for shard in shards:
            n = 0
            for key, files in _iter_tar(shard):
                n += 1
                yield shard, key, files
            empty = 0 if n else empty + 1
            if (self.repeat or self.resampled) and empty >= max(len(self.shards), 100):
                raise UserError(f"{empty} shards in a row without a sample ({shard}, ...): is --train-data right?")

    def __iter__(self) -> Iterator[Sample]:
        pending = 0
        skip = 0
        if self.skip_batches and not self.resampled:
            _, _, worker, workers = self.reader()
            skip = (self.skip_batches - worker + workers - 1) // workers * self.batch_size
        since_yield = 0  # records read since the last sample yielded: a repeated stream of nothing readable stops
        for shard, key, files in self._records():
            ext = next((e for e in SHARD_IMAGE_EXTENSIONS if files.get(e) is not None), None)
            if skip and ext:
                skip -= 1
                continue
            name = f"{shard}:{key}.{ext or '<image>'}"
            img = load_image(files[ext]) if ext else None
            if img is None:
                _note_broken(self.broken, name, "unreadable image" if ext else "no image in sample")
                pending += 1
                since_yield += 1
                if since_yield > 10_000 and (self.repeat or self.resampled):
                    raise UserError(f"{len(self.shards)} shard(s) ({self.shards[0]} ...): 10000 samples in a row "
                                    f"without a readable image")
                continue
            since_yield = 0
            caption = (files.get("txt") or b"").decode("utf-8", errors="replace").strip()
            base = key.rsplit("/", 1)[-1]
            index = int(base) if base.isascii() and base.isdigit() else -1
            yield {"image": self.transform(img), "caption": caption, "index": index, "skipped": pending}
            pending = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.shards)} shards{', resampled' if self.resampled else ''})"


def _buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """webdataset's shuffle: keep ``size`` items, yield a random one of them as each new one comes in."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


# ---------------------------------------------------------------------------------------------------------------------


def open_dataset(path: str | os.PathLike | Sequence[str | os.PathLike], **kw) -> Dataset:
    """The dataset for ``path``, by its form; ``kw`` go to the chosen class.

    ``.csv``/``.tsv`` -> :class:`CsvImageText`; ``.jsonl`` -> :class:`JsonlImageText`; a ``.tar`` file, a glob or
    brace pattern, a ``pipe:`` URL, an ``a::b`` list, a list of shards, or a directory holding ``.tar`` files ->
    :class:`WebDatasetShards`; any other directory -> :class:`ImageFolderDataset`.
    """
    if isinstance(path, (list, tuple)):
        return WebDatasetShards(path, **kw)
    s = os.fspath(path)
    if is_pipe_url(s) or "::" in s:
        return WebDatasetShards(s, **kw)
    p = Path(s)
    if p.is_dir():
        if any(c.suffix == ".tar" and c.is_file() for c in p.iterdir()):
            return WebDatasetShards(s, **kw)
        return ImageFolderDataset(s, **kw)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return CsvImageText(s, **kw)
    if suffix == ".jsonl":
        return JsonlImageText(s, **kw)
    if suffix == ".tar" or glob.has_magic(s) or _BRACE_GROUP.search(s):
        return WebDatasetShards(s, **kw)
    if not p.exists():
        raise UserError(f"no such file or directory: {s}")
    raise UserError(f"{s}: unknown dataset format; expected a .csv/.tsv, a .jsonl, .tar shards or an image folder")
