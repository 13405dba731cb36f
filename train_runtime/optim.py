"""AdamW with parameter groups (no weight decay on norms, biases and embeddings) and LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of linear/conv layers: 1-D tensors (biases, norm scales), nn.Embedding weights and
    parameters named like embeddings (positional / learned queries, ``*embed*``, ``*pos*``) are not decayed."""
    no_decay: set[int] = set()
    for mod in module.modules():
        if isinstance(mod, nn.Embedding):
            no_decay.update(id(p) for p in mod.parameters(recurse=False))
    decay, keep = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1].lower()
        if p.ndim < 2 or id(p) in no_decay or "embed" in leaf or "pos" in leaf or "codebook" in name.lower():
            keep.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups


def make_optimizer(module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=betas, **kwargs)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step``: linear warmup, then cosine down to ``min_ratio`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(opt: torch.optim.Optimizer, warmup: int, total: int, schedule: str,
                   min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, schedule, min_ratio))
