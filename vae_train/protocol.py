"""The image-tokenizer protocol every tokenizer kind implements, and the helpers the grid tokenizers share.

    encode(images01 [B, C, H, W] in [0, 1]) -> LongTensor [B, seq_len]   (row-major over a token grid, or ordered)
    decode(indices [B, seq_len])             -> images [B, C, H, W] in [0, 1] (clamped)

Each model normalises internally. The kinds are listed in :mod:`vae_train.registry`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class ImageTokenizer(Protocol):
    """What the DALLE transformer, the tokenize step and the samplers need from an image tokenizer.

    ``num_tokens`` is the codebook size, ``image_size`` the nominal square side in pixels, ``fmap_size`` the side of the
    token grid at ``image_size`` and ``seq_len = fmap_size ** 2``. ``encode``/``decode`` run without gradients and with
    eval-mode semantics whatever the module's training flag is (the flag is restored afterwards).
    """

    num_tokens: int
    image_size: int

    @property
    def fmap_size(self) -> int: ...

    @property
    def seq_len(self) -> int: ...

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, indices: Tensor, grid: tuple[int, int] | None = None) -> Tensor: ...


_F = TypeVar("_F", bound=Callable)


def inference(fn: _F) -> _F:
    """Decorate a module method: run it under ``torch.no_grad()`` in eval mode, then restore the training flag."""

    @functools.wraps(fn)
    def wrapper(self: nn.Module, *args, **kwargs):
        was_training = self.training
        self.train(False)
        try:
            with torch.no_grad():
                return fn(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return wrapper  # type: ignore[return-value]


def check_images(images: Tensor, channels: int, factor: int) -> None:
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"expected images of shape [B, {channels}, H, W], got {tuple(images.shape)}")
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"image height and width must be divisible by {factor}, got {tuple(images.shape[2:])}")


def token_grid(indices: Tensor, num_tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """Check a [B, n] index tensor and return its (h, w) grid (square unless ``grid`` says otherwise)."""
    if indices.ndim != 2:
        raise ValueError(f"expected indices of shape [B, seq_len], got {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"expected integer indices, got {indices.dtype}")
    n = indices.shape[1]
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold {n} tokens")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_tokens):
        raise ValueError(f"indices must lie in [0, {num_tokens}), got [{int(indices.min())}, {int(indices.max())}]")
    return grid



class GridSizes:
    """Token-grid sizes shared by the grid tokenizers (they define ``image_size`` and ``downsample_factor``)."""

    image_size: int
    downsample_factor: int

    @property
    def fmap_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def seq_len(self) -> int:
        return self.fmap_size**2
