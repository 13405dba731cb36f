"""Small file helpers: atomic writes (temp file + rename) and early checks that an output place is writable."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from typing_extensions import Self

from zh_t2i_base.cli import UserError, note_made_dirs


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and prove a file can be written there; UserError if not. The directories it
    creates are removed again, if still empty, when the command fails (:func:`zh_t2i_base.cli.run`)."""
    p = Path(path)
    new = [d for d in (p, *p.parents) if not d.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        note_made_dirs(new)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to output directory {p}: {e.strerror or e}") from None
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` to write (by any library) that is synced and renamed onto ``path`` only on success.

    A crash or kill while writing leaves the previous file (or none) and never a half-written one; the temp name is
    ``.{name}.*.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open ``path`` for writing through :func:`atomic_path`."""
    binary = "b" in mode
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if binary else encoding,
                                        newline=None if binary else "") as f:
        yield f


class StagedFiles:
    """Several outputs that appear together or not at all: write each to a temp path, then :meth:`commit`.

    ``with StagedFiles() as st: f = st.path(out/'a.csv'); ...; st.commit()`` — on error every temp file is removed.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        self._pending.append((Path(tmp), final))
        return Path(tmp)

    def commit(self) -> None:
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._pending.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()  # after a commit there is nothing left to discard


def utf8_error(path: str | os.PathLike) -> UserError:
    """The error for a text file that is not UTF-8, naming its first bad line (gzip files are looked into)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = None
    with opener(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                line_no = i
                break
    return UserError(f"{path}:{line_no}: not valid UTF-8 text" if line_no else f"{path}: not valid UTF-8 text")


def read_structured(path: str | os.PathLike, what: str = "file", expect: type = dict, yaml: bool = False):
    """The JSON document of ``path`` (with ``yaml``: YAML unless it ends in .json), checked to be an ``expect``.

    Every problem with the file (missing, a directory, unreadable, not UTF-8, not valid JSON/YAML, the wrong top-level
    shape) is a one-line UserError naming the file, the ``what`` it should be, and the line where the parser says."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}" if not path.exists() else f"{what} {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if yaml and path.suffix.lower() != ".json":
        import yaml as pyyaml

        try:
            data = pyyaml.safe_load(text)
        except pyyaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise UserError(f"{path}{where}: not valid YAML ({problem}); expected a {what}") from None
        if data is None and expect is dict:
            data = {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected a {what}") from None
    if not isinstance(data, expect):
        shape = {dict: "an object (a mapping of names to values)", list: "a list"}.get(expect, expect.__name__)
        raise UserError(f"{path}: expected {shape} as the {what}, found {type(data).__name__}")
    return data


def require_keys(data: dict, keys: Iterable[str], path: str | os.PathLike, what: str = "file") -> None:
    """UserError naming ``path`` and the missing keys unless ``data`` holds every one of ``keys``."""
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserError(f"{path}: not a {what}: no {', '.join(repr(k) for k in missing)} in it")


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Around the reading of one input file (a generator's body too): a decode, decompression or I/O error becomes
    a one-line UserError naming the file."""
    try:
        yield
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    except (EOFError, zlib.error) as e:
        raise UserError(f"{path}: corrupt or truncated {what} ({e})") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise utf8_error(path) from None
    return rows


def load_torch(path: str | os.PathLike, what: str, hint: str = "", map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with the toolkit's errors: ``"{what} not found: {path}{hint}"`` or
    ``"{path}: not a loadable {what} (reason)"`` as a UserError, never a traceback."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}{hint}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a loadable {what} ({msg})") from None
