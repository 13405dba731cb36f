"""What every reranking scorer is: the :class:`Scorer` protocol, and the embedding scorer the CLIP-style ones share.

A scorer's ``score(text, images)`` encodes the text once and the images in batches and returns one finite float per
image, higher = better. Its factory is called as ``factory(args, device=..., batch_size=..., trust_checkpoint=...,
precision=...)`` with the colon-split remainder of ``--scorer PREFIX:ARG[:ARG...]`` (see :mod:`.registry`).

Speed on CPU (exact in fp32): a conv image tower gets its BatchNorms folded into its convs and channels-last weights,
and runs a few images at a time so its activations stay in cache, while the text is encoded once. ``precision``
"bf16"/"fp16" runs the towers under autocast (CUDA, or a CPU with AVX512-BF16/AMX for bf16); scores then differ from
fp32 by ~1e-3.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from zh_t2i_base.cli import UserError
from zh_t2i_base.precision import autocast, fold_batchnorm


class Scorer(Protocol):
    def score(self, text: str, images: list[Image.Image]) -> np.ndarray:
        """One finite float per image (higher = better); the text is encoded once, the images in batches."""
        ...



def need_args(args: list[str], names: Sequence[str], prefix: str) -> list[str]:
    if len(args) != len(names) or not all(args):
        raise UserError(f"--scorer {prefix}:{':'.join(args)}: expected {prefix}:{':'.join(names)}")
    return args



class EmbeddingScorer:
    """Cosine similarity of one text embedding with batched image embeddings; the model-specific parts are passed in:
    ``preprocess`` (PIL -> tensor [3, H, W]), ``encode_images`` (batch -> [B, D]), ``encode_text`` (str -> [1, D]).
    On CPU a batch goes through ``encode_images`` in chunks of about :attr:`cpu_chunk_pixels` input pixels (measured:
    RN50 at 224 px is 1.2-1.5x faster per image 4-8 images at a time than at batch 32, whose activations fall out
    of cache; a 64 px tower is fastest at the whole batch)."""

    cpu_chunk_pixels = 8 * 224 * 224

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor],
                 encode_images: Callable[[torch.Tensor], torch.Tensor], encode_text: Callable[[str], torch.Tensor],
                 device: torch.device, batch_size: int = 32, precision: str = "fp32"):
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self.preprocess, self.encode_images, self.encode_text = preprocess, encode_images, encode_text
        self.device, self.batch_size, self.precision = device, batch_size, precision
        self._threads: ThreadPoolExecutor | None = None

    def _prep(self, img: Image.Image) -> torch.Tensor:
        return self.preprocess(img if img.mode == "RGB" else img.convert("RGB"))

    def _pool(self) -> ThreadPoolExecutor:
        """Threads for the PIL resizes (which release the GIL): one per core, at most 8."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="preprocess")
        return self._threads

    def _images(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        step = max(1, self.cpu_chunk_pixels // (batch.shape[-1] * batch.shape[-2])) if self.device.type == "cpu" \
            else len(batch)
        return torch.cat([self.encode_images(batch[i:i + step]) for i in range(0, len(batch), step)])

    @torch.inference_mode()
    def score(self, text: str, images: list[Image.Image]) -> np.ndarray:
        with autocast(self.device, self.precision):
            text_feature = torch.nn.functional.normalize(self.encode_text(text).float(), dim=-1)
        scores = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack(list(self._pool().map(self._prep, images[i:i + self.batch_size])))
            with autocast(self.device, self.precision):
                feats = self._images(batch)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            scores.append((feats @ text_feature.T).squeeze(1).cpu())
        return torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0)


def fast_image_tower(tower: nn.Module, image_size: int, device: torch.device) -> nn.Module:
    """``tower`` (eval mode, weights loaded) with its BatchNorms folded into its convs and channels-last weights;
    checked on a probe image against the original (see :func:`zh_t2i_base.precision.fold_batchnorm`)."""
    x = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    return fold_batchnorm(tower, lambda m: m(x)).to(memory_format=torch.channels_last)


