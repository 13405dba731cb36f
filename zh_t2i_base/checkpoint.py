"""Reading the checkpoint files this toolkit writes (inference needs nothing else; writing and resuming are
``train_runtime.checkpoint``'s).

A training checkpoint is one ``torch.save`` file ``ckpt-{step:08d}.pt`` of plain tensors and Python values (it loads
with ``torch.load(weights_only=True)``); an export is a ``.safetensors`` file with a JSON ``meta`` entry.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import load_torch

CKPT_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temp files of an interrupted save are not listed)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if CKPT_NAME.match(p.name))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a broken or foreign file is a UserError."""
    obj = load_torch(path, "checkpoint", map_location=map_location)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a checkpoint of this toolkit (got {type(obj).__name__})")
    return obj


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, state_dict)`` of a weights file written by :func:`export_safetensors` with ``{"meta": json}``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        first = str(e).splitlines()[0] if str(e) else e
        raise UserError(f"{path}: not a readable safetensors file ({first})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: its safetensors metadata holds no meta dict")
    return meta, state


def read_weights(path: str | os.PathLike, module: str, export_name: str, what: str) -> tuple[dict, dict, Path]:
    """``(meta, state_dict, file)`` of a model of ours: a run directory (its newest ``ckpt-*.pt``, else its
    ``export_name`` safetensors), a ``ckpt-*.pt`` (the weights of ``modules[module]``) or a ``.safetensors`` export.
    ``what`` names the model in errors. The caller checks ``meta['kind']``."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if p.is_dir():
        found = checkpoints(p)
        if found:
            p = found[-1]
        elif (p / export_name).is_file():
            p = p / export_name
        else:
            raise UserError(f"{p}: no {what} in it (ckpt-*.pt or {export_name})")
    if p.suffix == ".safetensors":
        meta, state = load_safetensors(p)
    else:
        obj = load(p)
        meta, state = obj.get("meta") or {}, (obj.get("modules") or {}).get(module)
        if not isinstance(meta, dict) or not isinstance(state, dict):
            raise UserError(f"{p}: not a {what} of this toolkit (no meta / '{module}' weights)")
    return meta, state, p
