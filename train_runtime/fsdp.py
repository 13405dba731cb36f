"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and activation checkpointing for the one runtime.

A model is sharded block by block: every element of its outermost ``nn.ModuleList`` s that is itself built of modules
(a transformer block, a Styled-VQ block, a VQGAN resolution level) becomes its own FSDP unit, then the whole model is
one more (the embeddings, heads and anything outside the blocks). The sharded parameters, their gradients and the
optimizer state stay fp32; gradients are reduced in fp32. By default a unit gathers its parameters in fp32 and computes
under the run's autocast (bf16 on CUDA), as DDP does; ``--fsdp-param-dtype bf16`` gathers them in bf16 and computes in
bf16 without autocast (half the all-gather traffic) for models without fp32 islands (Styled-VQ's bottleneck is one).

Checkpoints hold FULL state dicts (gathered to rank 0 on CPU; the optimizer's keyed by parameter name), so a run
resumes on any number of processes, with or without FSDP, and its weights load for inference without FSDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the elements of its outermost ModuleLists that have sub-modules of their own."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            for child in module:
                if next(child.children(), None) is not None:
                    found.append(child)
                    inside.update(id(m) for m in child.modules())
    return found


def prepare(model: nn.Module, param_dtype: str, shard: bool, checkpointing: bool) -> int:
    """Activation checkpointing (``checkpointing``) and FSDP units (``shard``) on ``model``'s blocks, in place;
    parameter names stay those of the plain model. Returns the number of blocks."""
    units = blocks(model)
    if checkpointing:
        from torch.distributed._composable import checkpoint

        for block in units:
            checkpoint(block)
    if shard:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32)
        for block in units:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return len(units)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    """The whole model's state dict on rank 0's CPU (empty on the other ranks); all ranks must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name, on rank 0's CPU; all ranks must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def by_name(state: dict) -> bool:
    """Whether an optimizer state dict is keyed by parameter name (this module's) rather than by position."""
    return any(isinstance(k, str) for k in state.get("state", {})) or any(
        isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))


def named_optimizer_state(model: nn.Module, make: Callable[[], torch.optim.Optimizer], state: dict) -> dict:
    """A positional optimizer state (``optimizer.state_dict()`` of a plain or DDP run) keyed by parameter name,
    through a plain optimizer ``make()`` builds over the not yet sharded ``model``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = make()
    optimizer.load_state_dict(state)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore ``state`` (either kind) into ``optimizer`` over ``model``, sharded or not."""
    if not by_name(state):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def gathered(models: list[nn.Module]) -> Iterator[None]:
    """Every FSDP unit of ``models`` unsharded and kept so (no collective in a forward) while inside, so that rank 0
    alone can evaluate and sample; all ranks must enter and leave it together."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)
