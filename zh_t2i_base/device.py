"""Device names from the command line -> ``torch.device`` (one resolver for every package)."""

from __future__ import annotations

import torch

from zh_t2i_base.cli import UserError


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` if CUDA is available, else cpu; ``None`` -> cpu; ``"cuda"`` ->
    ``cuda:<local_rank>``; anything else as torch names it. An unknown name or CUDA without CUDA is a UserError."""
    if isinstance(spec, torch.device):
        return spec
    if spec is None:
        return torch.device("cpu")
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev
