"""Precisions and inference speed-ups, for training and inference alike.

``PRECISIONS`` names the precisions every trainer and scorer accepts; :func:`autocast` is the context a model runs in
("bf16"/"fp16": ``torch.autocast``; "fp32": nothing); :func:`resolve_precision` turns a training ``--precision`` into
one of them, :func:`check_precision` refuses one the device cannot run (the same line for training and inference),
and :func:`cpu_training_precision` says which one a CPU trains fastest in.

``fold_batchnorm`` folds every eval-mode ``BatchNorm2d`` into the ``Conv2d`` that feeds it (w' = w * g / sqrt(v + eps),
b' = beta + (b - mean) * g / sqrt(v + eps)), so a conv tower runs one pass per layer instead of two; timm's
``BatchNormAct2d`` keeps its activation. The pairing (a BN follows the last conv registered before it in the same
parent) is checked on a probe input: if the folded copy does not give the original's output, the original is kept.
Folded modules are for inference only: their state dict no longer has the BN keys, so load weights first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from zh_t2i_base.cli import UserError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context for ``precision`` on ``device`` (disabled for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def cpu_training_precision() -> str:
    """"bf16" where this CPU runs bf16 convolutions and matmuls natively through oneDNN (AVX512-BF16 / AMX: about
    1.5x the training images/s of fp32 for the demo's tokenizer), else "fp32". CPU runs default to fp32; the demo
    asks for this."""
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported() and "AVX512" in torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


def resolve_precision(precision: str, device: torch.device) -> str:
    """A training ``--precision`` (auto or one of :data:`PRECISIONS`) on ``device`` -> the precision to run:
    auto is bf16 on a CUDA device that has it, else fp32; fp16 needs CUDA."""
    if precision != "auto" and precision not in PRECISIONS:
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return check_precision(precision, device)


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` (one of :data:`PRECISIONS`) if ``device`` runs it, else the one-line UserError every trainer,
    scorer and feature extractor gives: fp16 needs CUDA (a CPU has no fast fp16 kernels and no GradScaler)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    return precision


def _fold_in_place(module: nn.Module) -> int:
    folded = 0
    for parent in list(module.modules()):
        conv = None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                conv = child
            elif isinstance(child, nn.BatchNorm2d) and conv is not None and child.track_running_stats \
                    and child.running_var is not None and conv.out_channels == child.num_features:
                scale = torch.rsqrt(child.running_var + child.eps)
                if child.weight is not None:
                    scale = scale * child.weight
                shift = -child.running_mean * scale
                if child.bias is not None:
                    shift = shift + child.bias
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                conv.weight = nn.Parameter((conv.weight * scale.view(-1, 1, 1, 1)).detach(), requires_grad=False)
                conv.bias = nn.Parameter(shift.detach(), requires_grad=False)
                after = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
                setattr(parent, name, nn.Sequential(*after) if after else nn.Identity())
                folded += 1
                conv = None
    return folded


@torch.no_grad()
def fold_batchnorm(module: nn.Module, probe: Callable[[nn.Module], Tensor], rtol: float = 1e-4) -> nn.Module:
    """A copy of eval-mode ``module`` with its BatchNorms folded into their convs, if ``probe(copy)`` matches
    ``probe(module)`` to ``rtol`` of the output's scale; else ``module`` itself. ``probe`` runs the module on a
    fixed input (BN in eval mode is per channel, so a small input proves the pairing)."""
    if module.training:
        return module
    folded = copy.deepcopy(module)
    if not _fold_in_place(folded):
        return module
    want, got = probe(module).float(), probe(folded).float()
    if want.shape != got.shape or (got - want).abs().max() > rtol * want.abs().max().clamp_min(1e-12):
        return module
    return folded

