"""Process groups and devices: one process (``python -m pkg``) or many (``torchrun``, single or multi node).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with them we join a process group (nccl on
CUDA, gloo on CPU). Without them we are rank 0 of 1 and no process group exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zh_t2i_base.device import resolve_device


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    joined: bool = False  # in a process group (every torchrun launch, even of one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """DDP / FSDP / collectives: under torchrun (nccl on CUDA, gloo on CPU), even with one process."""
        return self.world_size > 1 or self.joined


def setup(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets it, also for --nproc_per_node 1
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                   joined=dist.is_available() and dist.is_initialized())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group. A barrier first: destroying right after a collective can abort rank 0 (gloo)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank only if ``flag`` holds on every rank (one tiny all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def any_true(flag: bool, device: torch.device) -> bool:
    return not all_true(not flag, device)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged scalars over all processes (every rank must pass the same keys in the same order)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(values, t.tolist(), strict=True)}
