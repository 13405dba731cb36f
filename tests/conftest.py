"""Test-wide guards: no network except loopback, no hub, no telemetry."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): each worker, and every process it starts, computes
    # on one thread, so workers never wait on each other's OpenMP threads
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
_real_connect = socket.socket.connect


def _is_loopback(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self, address):
    if not _is_loopback(address):
        raise OSError(f"network access blocked in tests: {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _guarded_connect


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repo root (or cwd) and capture text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
                          check=False, timeout=600)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """Assert the CLI error convention (exit 2, one line as a terminal shows it, no traceback); return the line."""
    assert result.returncode == 2, result.stderr
    # what a terminal shows: a progress bar that was cleared with "\r" leaves nothing
    lines = [line.split("\r")[-1] for line in result.stderr.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def cli():
    return run_cli


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """What ``run_cli(*args)`` gives (exit code, stdout, stderr) for ``-m PKG[.MOD] ...`` or ``SCRIPT.py ...``, without
    a new process's seconds of start-up: the command's ``main`` under the same ``zh_t2i_base.cli.run`` wrapper. For the
    many bad-input cases of one command; one case per command still runs as a real process (import-time noise)."""
    import contextlib
    import importlib
    import io

    from zh_t2i_base.cli import run

    if args[0] == "-m":
        name, argv = args[1], list(args[2:])
        module = importlib.import_module(name)
        if not hasattr(module, "main"):
            module = importlib.import_module(f"{name}.__main__")
    else:
        name, argv = args[0], list(args[1:])
        module = importlib.import_module(Path(name).stem)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(module.main, argv, prog=name)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([sys.executable, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli_fast():
    return run_in_process
