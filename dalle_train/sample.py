"""Sampling image tokens from a DALLE model: KV-cached, batched, classifier-free guidance, top-k over image ids.

Fixes of DALLE-pytorch's sampler (../shared/specs/dalle_anchor.md §1.5): the cache is always used; guidance runs the
conditional and the null caption as two halves of ONE batch through one cache (each row has its own K/V, nothing is
shared or mutated); the caller's text tensor is never written to; top-k is taken over the image vocabulary only.

Reproducibility: image ``i`` draws its sampling noise from its own generator seeded with ``seeds[i]``, so it does not
depend on the batch size or on the other images of the call (up to floating-point differences between batch shapes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dalle_train.model import DALLE


def top_k_count(num_image_tokens: int, top_k: int | None = None, filter_thres: float | None = None) -> int:
    """How many image ids stay candidates: ``top_k`` itself, or the fraction ``1 - filter_thres`` of the IMAGE
    vocabulary (DALLE-pytorch's formula, but over image ids only); default: all."""
    if top_k is not None and filter_thres is not None:
        raise ValueError("give top_k or filter_thres, not both")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return min(top_k, num_image_tokens)
    if filter_thres is not None:
        if not 0.0 <= filter_thres < 1.0:
            raise ValueError(f"filter_thres must be in [0, 1), got {filter_thres}")
        return max(int((1.0 - filter_thres) * num_image_tokens), 1)
    return num_image_tokens


def guided(logits: Tensor, cond_scale: float) -> Tensor:
    """Rows ``[cond; null]`` -> ``null + (cond - null) * cond_scale`` (classifier-free guidance)."""
    cond, null = logits.chunk(2)
    return null + (cond - null) * cond_scale


def pick(logits: Tensor, k: int, temperature: float, generators: list[torch.Generator]) -> Tensor:
    """Sample one id per row among its ``k`` largest logits, with softmax(logits / temperature) probabilities
    (Gumbel-max with per-row noise, so row ``r`` depends only on ``generators[r]``)."""
    values, ids = logits.float().topk(k, dim=-1)
    if temperature <= 0:
        return ids[:, 0]
    u = torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in generators]).to(values.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300))).float()
    return ids.gather(1, (values / temperature + gumbel).argmax(dim=-1, keepdim=True))[:, 0]


@torch.no_grad()
def caption_batches(model: nn.Module, text: Tensor, seeds: list[int], batch_size: int, guidance: bool
                    ) -> Iterator[tuple[list[int], Tensor, list[torch.Generator]]]:
    """The batches both samplers (this one and :mod:`dalle_train.masked_sample`) draw ``len(seeds)`` images in:
    ``(rows, captions, generators)`` with the batch's captions on the model's device (the null caption appended as a
    second half when ``guidance``) and one generator per image seeded with its seed, so that image ``i`` does not
    depend on the batch size. ``text``: one caption for every image or one per image."""
    cfg, n = model.cfg, len(seeds)
    if n < 1:
        raise ValueError("need at least one seed (one image)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    text = text.reshape(-1, cfg.text_seq_len)
    if text.shape[0] not in (1, n):
        raise ValueError(f"text holds {text.shape[0]} captions for {n} images")
    device = model.text_emb.weight.device
    for lo in range(0, n, batch_size):
        rows = list(range(lo, min(n, lo + batch_size)))
        t = (text.expand(n, -1) if text.shape[0] == 1 else text)[rows].to(device)
        if guidance:
            t = torch.cat([t, torch.full_like(t, cfg.text_pad_id)])
        yield rows, t, [torch.Generator().manual_seed(int(seeds[r])) for r in rows]


@contextlib.contextmanager
def sampling_mode(model: nn.Module, autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """``model`` in eval mode (its training flag put back afterwards), under autocast to ``autocast_dtype`` or none."""
    device = model.text_emb.weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            yield
    finally:
        model.train(was_training)


def sample_tokens(model: DALLE, text: Tensor, seeds: list[int], *, batch_size: int = 32, top_k: int | None = None,
                  filter_thres: float | None = None, temperature: float = 1.0, cond_scale: float = 1.0,
                  guidance: bool | None = None, progress: bool = False,
                  autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Image token ids ``[len(seeds), image_seq_len]`` for a caption.

    ``text``: ``[text_seq_len]`` or ``[1, text_seq_len]`` ids (one caption for every image) or ``[len(seeds),
    text_seq_len]`` (one per image); it is only read. ``guidance`` (default: ``cond_scale != 1``) runs the null
    caption alongside; with ``cond_scale == 1`` it gives the plain conditional distribution.
    """
    cfg = model.cfg
    n = len(seeds)
    k = top_k_count(cfg.num_image_tokens, top_k, filter_thres)
    guidance = cond_scale != 1.0 if guidance is None else guidance
    out = torch.empty(n, cfg.image_seq_len, dtype=torch.long)
    with sampling_mode(model, autocast_dtype), tqdm(total=n * cfg.image_seq_len, desc="sampling", unit="tok",
                                                    disable=not progress, leave=False) as bar:
        for rows, t, generators in caption_batches(model, text, seeds, batch_size, guidance):
            b = len(rows)
            cache = model.new_cache(t.shape[0])
            tokens = torch.empty(b, cfg.image_seq_len, dtype=torch.long, device=t.device)
            logits = model.prefill(t, cache)
            for i in range(cfg.image_seq_len):
                scores = guided(logits, cond_scale) if guidance else logits
                tokens[:, i] = pick(scores, k, temperature, generators)
                bar.update(b)
                if i + 1 < cfg.image_seq_len:
                    step_in = torch.cat([tokens[:, i], tokens[:, i]]) if guidance else tokens[:, i]
                    logits = model.step(step_in, cache)
            out[rows] = tokens.cpu()
    return out
