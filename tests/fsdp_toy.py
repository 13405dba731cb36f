"""A small model of repeated blocks trained on the runtime, run by tests/test_fsdp.py (under torchrun or alone):

    python tests/fsdp_toy.py OUT_DIR key=value ...     (RuntimeConfig fields, e.g. fsdp=1 max_steps=8 resume=latest)

Its evaluation runs the model on rank 0 only, as every task's does (under FSDP: on the gathered model)."""

from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from train_runtime import RuntimeConfig, Task, Trainer


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, torch.sin(x).sum(1, keepdim=True))


class ToyTask(Task):
    def __init__(self):
        torch.manual_seed(0)
        self.net = Net()
        self.val = data(64).tensors

    def modules(self):
        return {"model": self.net}

    def training_step(self, batch, step):
        x, y = batch
        return {"model": ((self.ddp["model"](x) - y) ** 2).mean()}, {}

    def evaluate(self, step):
        x, y = self.val
        return {"mse": float(((self.ddp["model"](x).float() - y) ** 2).mean())}

    def meta(self):
        return {"kind": "fsdp-toy"}


def main(argv: list[str]) -> None:
    kw = {"out_dir": argv[0], "max_steps": 8, "batch_size": 16, "log_every": 1, "save_every": 4, "workers": 0,
          "lr": 3e-3, "warmup_steps": 0, "device": "cpu"}
    for item in argv[1:]:
        key, value = item.split("=", 1)
        default = getattr(RuntimeConfig, key, "")
        kw[key] = bool(int(value)) if isinstance(default, bool) else type(default)(value) if default != "" else value
    result = Trainer(RuntimeConfig(**kw), ToyTask(), data()).fit()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
