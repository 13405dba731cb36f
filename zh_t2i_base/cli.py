"""The one user-error convention shared by every CLI of the toolkit.

A user mistake (missing file, wrong column, bad flag, unwritable output ...) raises :class:`UserError`; :func:`run`
turns it into a single line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

EXIT_USER_ERROR = 2
STARTUP_LOG_ENV = "ZH_T2I_STARTUP_LOG"  # a file: each CLI process appends "<start-up s>\t<total s>" when it ends


class _ImportClock:
    """Seconds a process spent starting: from its creation (Linux /proc) to this module's import, plus every
    outermost ``import`` after that (lazy imports inside a command's ``main`` included). On when
    ``$ZH_T2I_STARTUP_LOG`` names a file: the demo uses it to tell start-up from compute in its step table."""

    def __init__(self) -> None:
        self.started = self._process_start()
        self.before = time.time() - self.started
        self.imports = 0.0
        self._depth = 0
        import builtins

        self._import = builtins.__import__
        builtins.__import__ = self._timed

    @staticmethod
    def _process_start() -> float:
        try:
            with open(f"/proc/{os.getpid()}/stat") as f:
                ticks = float(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/uptime") as f:
                uptime = float(f.read().split()[0])
            return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return time.time()

    def _timed(self, name, *args, **kwargs):
        if self._depth:
            return self._import(name, *args, **kwargs)
        self._depth += 1
        t = time.perf_counter()
        try:
            return self._import(name, *args, **kwargs)
        finally:
            self._depth -= 1
            self.imports += time.perf_counter() - t

    def write(self, path: str) -> None:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{max(0.0, self.before) + self.imports:.3f}\t{time.time() - self.started:.3f}\n")
        except OSError:
            pass


_clock = _ImportClock() if os.environ.get(STARTUP_LOG_ENV) else None


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, never a traceback."""


@contextlib.contextmanager
def user_errors(*types: type[Exception]) -> Iterator[None]:
    """Inside it, the exception types given (e.g. the ValueError a model file raises about its input) become a
    :class:`UserError` with the same message. Use it around the one call that checks the user's input, no wider."""
    try:
        yield
    except types as e:
        raise UserError(str(e)) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and a one-line error (argparse prints the whole usage otherwise)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (argparse turns the ValueError into a one-line usage error)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    parse.minimum, parse.maximum = minimum, None  # type: ignore[attr-defined]  (read by the bad-input sweep test)
    return parse


def int_in(minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [minimum, maximum] (e.g. a TCP port, 0..65535)."""

    def parse(text: str) -> int:
        value = int(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be an integer in [{minimum}, {maximum}], got {value}")
        return value

    parse.__name__ = f"integer in [{minimum}, {maximum}]"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
port_number = int_in(0, 65535)  # 0: any free port


def finite_float(minimum: float | None = None, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite number (no nan / inf), within [minimum, maximum] where given."""

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            low = "-inf" if minimum is None else f"{minimum:g}"
            high = "inf" if maximum is None else f"{maximum:g}"
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value:g}")
        return value

    parse.__name__ = "float"
    parse.minimum, parse.maximum = minimum, maximum  # type: ignore[attr-defined]
    return parse


_SHARD_PATTERN = re.compile(r"\{(\d+\.\.\d+|[^{}]*,[^{}]*)\}|[*?\[]")  # a brace range or list, or a glob


class PathArg:
    """An argparse ``type`` for a path flag, checked while the command line is parsed, before any work and without
    creating anything:

    - ``role="in"``: the path exists (a file, or a directory, where ``kind`` says which);
    - ``role="out"``: it can be written: an existing path of the right kind that is writable, or a new one whose nearest
      existing parent is a directory in which a file can be created (probed with a temp file, removed at once).

    ``content`` says what an input holds ("table", "json", "jsonl", "yaml", "checkpoint", "text", "images", "npy",
    "tokens"): it is shown in --help and drives the bad-input sweep test, which feeds each kind its broken variants.
    The parsed value stays the string given; an empty string means "not given" and passes unchecked. With ``urls``
    (an input of webdataset shards) a ``pipe:CMD`` URL, an ``a::b`` list, a brace pattern (``{000..009}``, ``{a,b}``)
    or a glob also passes unchecked here: the data set expands and checks it when it is opened."""

    def __init__(self, role: str, kind: str = "any", content: str = "", urls: bool = False):
        if role not in ("in", "out") or kind not in ("file", "dir", "any"):
            raise ValueError(f"bad PathArg({role!r}, {kind!r})")
        self.role, self.kind, self.content, self.urls = role, kind, content, urls
        self.__name__ = f"{'input' if role == 'in' else 'output'} {'path' if kind == 'any' else kind}"

    def __repr__(self) -> str:
        return f"PathArg({self.role!r}, {self.kind!r}, {self.content!r})"

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self.urls and (text.startswith("pipe:") or "::" in text or _SHARD_PATTERN.search(text)):
            return text
        path = Path(text).expanduser()
        (self._check_input if self.role == "in" else self._check_output)(path)
        return text

    def _check_input(self, path: Path) -> None:
        if not path.exists():
            raise argparse.ArgumentTypeError(f"not found: {path}")
        if self.kind == "file" and path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a directory, expected a file")
        if self.kind == "dir" and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is not a directory")

    def _check_output(self, path: Path) -> None:
        if path.exists():
            if self.kind == "file" and path.is_dir():
                raise argparse.ArgumentTypeError(f"{path} is a directory, expected a file to write")
            if self.kind == "dir" and not path.is_dir():
                raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
            if not path.is_dir():
                if not os.access(path, os.W_OK):
                    raise argparse.ArgumentTypeError(f"cannot write {path}: permission denied")
                path = path.parent
            parent = path
        else:
            parent = path.parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is not a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot write {path}: {e.strerror or e} in {parent}") from None


IN_FILE, IN_DIR, IN_PATH = PathArg("in", "file"), PathArg("in", "dir"), PathArg("in")
OUT_FILE, OUT_DIR = PathArg("out", "file"), PathArg("out", "dir")


def prompt_text(text: str) -> str:
    """An argparse ``type`` for a prompt (TEXT, or @FILE of prompts): refuses an empty or blank one."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the text is empty")
    return text


prompt_text.__name__ = "prompt"


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """``{"cmd": parser, "cmd sub": parser, ...}``: every leaf command of an argparse tree of sub-parsers (the parser
    itself, as ``""``, when it has none). A CLI module's ``parsers()`` returns this kind of map."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.update(subcommands(child, f"{prefix} {name}".strip()))
    return out or {prefix: parser}


PROMPT_SEED_STRIDE = 1000  # with TEXT = @FILE, prompt i's images use seeds seed + 1000 i + j


def expand_prompts(text: str, directory: str) -> list[tuple[str, str]]:
    """``TEXT DIR`` -> ``[(TEXT, DIR)]``; ``@FILE DIR`` -> one ``(line i, DIR/p{i})`` per non-empty line of the UTF-8
    file FILE, so that one process (one start-up, one model load) serves many prompts."""
    if not text.startswith("@"):
        return [(text, directory)]
    path = text[1:]
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise UserError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (one prompt per line)") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise UserError(f"{path}: no prompt in it (one prompt per line)")
    return [(t, os.path.join(directory, f"p{i}")) for i, t in enumerate(prompts)]


_made_dirs: list[Path] = []  # output directories this command created (zh_t2i_base.fileio.ensure_writable_dir)


def note_made_dirs(paths: Sequence[Path]) -> None:
    """Remember directories a command created for its outputs: if it then fails, :func:`run` removes those still
    empty, so a failed command leaves no new empty directory behind."""
    _made_dirs.extend(paths)


def _remove_made_dirs() -> None:
    for path in sorted(set(_made_dirs), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()  # only an empty directory goes
    _made_dirs.clear()


def fail(prog: str, message: str) -> NoReturn:
    # Collapse to one line whatever the message holds (paths with newlines, chained OS errors).
    line = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {line}\n")
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, prog: str = "") -> NoReturn:
    """Run a CLI ``main(argv)``; UserError -> one line + exit 2; KeyboardInterrupt -> exit 130."""
    prog = prog or (sys.argv[0] if sys.argv and sys.argv[0] else "cli")
    _made_dirs.clear()
    try:
        code = main(argv)
    except UserError as e:
        _remove_made_dirs()
        fail(prog, str(e))
    except KeyboardInterrupt:
        _remove_made_dirs()
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.exit(130)
    finally:
        if _clock is not None:
            _clock.write(os.environ[STARTUP_LOG_ENV])
    sys.exit(int(code or 0))
