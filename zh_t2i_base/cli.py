"""The one user-error convention shared by every CLI of the toolkit.

A user mistake (missing file, wrong column, bad flag, unwritable output ...) raises :class:`UserError`; :func:`run`
turns it into a single line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


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

    parse.__name__ = "finite number"
    return parse


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


def fail(prog: str, message: str) -> NoReturn:
    # Collapse to one line whatever the message holds (paths with newlines, chained OS errors).
    line = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {line}\n")
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, prog: str = "") -> NoReturn:
    """Run a CLI ``main(argv)``; UserError -> one line + exit 2; KeyboardInterrupt -> exit 130."""
    prog = prog or (sys.argv[0] if sys.argv and sys.argv[0] else "cli")
    try:
        code = main(argv)
    except UserError as e:
        fail(prog, str(e))
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.exit(130)
    finally:
        if _clock is not None:
            _clock.write(os.environ[STARTUP_LOG_ENV])
    sys.exit(int(code or 0))
