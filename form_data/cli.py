"""The one user-error convention shared by every CLI of the toolkit.

A user mistake (missing file, wrong column, bad flag, unwritable output ...) raises :class:`UserError`; :func:`run`
turns it into a single line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, never a traceback."""


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
    sys.exit(int(code or 0))
