"""Complete, atomic, resumable checkpoints.

A checkpoint is one ``torch.save`` file ``ckpt-{step:08d}.pt`` holding plain tensors and Python values only (so it
loads with ``torch.load(weights_only=True)``): module and optimizer/scheduler/scaler states, step, epoch and
data-loader position, the RNG states (python, numpy, torch, cuda) and the resolved config. It is written to a temp
file and renamed into place: a kill during a save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from zh_t2i_base.checkpoint import checkpoints, load
from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import atomic_path


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state.get("python_gauss")))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(state: dict, run_dir: str | os.PathLike, step: int, keep_last: int = 3) -> Path:
    """Write ``ckpt-{step}.pt`` atomically, then drop all but the newest ``keep_last``."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"ckpt-{step:08d}.pt"
    with atomic_path(final) as tmp:
        torch.save(state, tmp)
    if keep_last > 0:
        for old in checkpoints(d)[:-keep_last]:
            old.unlink(missing_ok=True)
    return final


def remove_stale_temps(run_dir: str | os.PathLike) -> None:
    d = Path(run_dir)
    if d.is_dir():
        for p in d.glob(".ckpt-*.tmp"):
            p.unlink(missing_ok=True)


def resolve(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """``--resume latest`` -> newest checkpoint of the run (None if there is none yet); a path -> that file."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    p = Path(resume)
    if p.is_dir():
        found = checkpoints(p)
        if not found:
            raise UserError(f"--resume {resume}: no checkpoint in that directory")
        return found[-1]
    if not p.is_file():
        raise UserError(f"--resume {resume}: no such checkpoint")
    return p


def load_for_resume(resume: str, run_dir: str | os.PathLike) -> tuple[Path | None, dict | None]:
    """``(path, state)`` of the checkpoint ``--resume`` names (``(None, None)``: nothing to resume). With ``latest``
    or a directory, a newest checkpoint that does not load (truncated by a full disk, a copy cut short) gives way to
    the previous intact one, with a warning on stderr; an explicit file must load."""
    path = resolve(resume, run_dir)
    if path is None:
        return None, None
    explicit = resume not in ("latest",) and not Path(resume).is_dir()
    candidates = [path] if explicit else [p for p in reversed(checkpoints(path.parent)) if p.name <= path.name]
    for i, candidate in enumerate(candidates):
        try:
            return candidate, load(candidate)
        except UserError as e:
            if i == len(candidates) - 1:
                raise
            sys.stderr.write(f"warning: {e}; resuming from the previous checkpoint {candidates[i + 1].name}\n")
    raise AssertionError("unreachable")


def export_safetensors(state_dict: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Model weights alone, as safetensors (contiguous, de-duplicated tensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


