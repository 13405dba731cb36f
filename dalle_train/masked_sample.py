"""Sampling image tokens from a :class:`~dalle_train.masked.MaskedDALLE`: MaskGIT's confidence-based iterative
decoding.

Every image starts all ``[MASK]`` (or from ``init_tokens``). At step ``s = 0 .. S-1`` the model predicts every
position; a token is drawn at each masked position (top-k over the IMAGE vocabulary, so never ``[MASK]``, at
``temperature``); then all but the ``mask_schedule`` count of the masked positions are fixed: those with the highest
confidence (the token's log-probability plus Gumbel noise scaled by ``choice_temperature * (1 - (s+1)/S)``, MaskGIT's
randomness annealing), or, with ``order="sequential"``, the first ones in token order (coarse -> fine for
Styled-VQ's ordered tokens). Positions fixed once are never changed. Guidance runs the caption and the null caption
as two halves of ONE batch at every step, as the AR sampler does.

Reproducibility as :func:`dalle_train.sample.sample_tokens`: image ``i`` draws all its noise (token and confidence
noise, a fixed amount per step) from its own generator seeded ``seeds[i]``, so it does not depend on the batch size or
on the other images of the call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm import tqdm

from dalle_train.masked import MaskedDALLE
from dalle_train.sample import caption_batches, guided, sampling_mode, top_k_count

DEFAULT_STEPS = 12
DEFAULT_CHOICE_TEMPERATURE = 4.5  # MaskGIT's
ORDERS = ("confidence", "sequential")


def mask_schedule(masked: int, steps: int) -> list[int]:
    """How many positions are still masked after each of ``steps`` steps, starting from ``masked``:
    ``floor(masked * cos(pi/2 * (s+1)/steps))``, but at least one fewer than before while any are left (every step
    fixes at least one token), and 0 after the last step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out, left = [], masked
    for s in range(steps):
        target = 0 if s == steps - 1 else math.floor(masked * math.cos(math.pi / 2 * (s + 1) / steps))
        left = max(0, min(left - 1, target)) if left else 0
        out.append(left)
    return out


def _gumbel(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device) -> Tensor:
    """Gumbel(0, 1) noise ``[len(generators), *shape]``: row ``r`` from ``generators[r]`` only (float64 uniforms,
    as the AR sampler draws them)."""
    u = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in generators])
    return (-torch.log(-torch.log(u.clamp_min(1e-300)))).float().to(device)


def decode_step(scores: Tensor, tokens: Tensor, still_masked: Tensor, k: int, temperature: float,
                choice_noise: float, order: str, generators: list[torch.Generator]) -> Tensor:
    """One decoding step. ``scores`` ``[b, N, V]`` (guided) logits, ``tokens`` ``[b, N]`` (``[MASK]`` where
    unknown), ``still_masked`` ``[b]``: how many stay masked after this step. Returns the new tokens."""
    b, n, _ = scores.shape
    known = tokens < scores.shape[-1]  # [MASK] is the id after the last real one
    values, ids = scores.float().topk(k, dim=-1)  # [b, N, k]
    token_noise = _gumbel((n, k), generators, scores.device)  # always drawn: a fixed amount per step and image
    conf_noise = _gumbel((n,), generators, scores.device)
    if temperature <= 0:
        choice = torch.zeros(b, n, 1, dtype=torch.long, device=scores.device)
    else:
        choice = (values / temperature + token_noise).argmax(dim=-1, keepdim=True)
    sampled = ids.gather(-1, choice)[..., 0]
    if order == "sequential":
        confidence = -torch.arange(n, dtype=torch.float32, device=scores.device).expand(b, n).clone()
    else:
        confidence = values.log_softmax(dim=-1).gather(-1, choice)[..., 0] + choice_noise * conf_noise
    confidence = confidence.masked_fill(known, math.inf)
    ranks = confidence.argsort(dim=-1, stable=True).argsort(dim=-1)
    stay = ranks < still_masked.to(scores.device)[:, None]  # the least confident masked positions stay masked
    return torch.where(known, tokens, torch.where(stay, tokens, sampled))


@torch.no_grad()
def sample_tokens_masked(model: MaskedDALLE, text: Tensor, seeds: list[int], *, steps: int = DEFAULT_STEPS,
                         batch_size: int = 32, top_k: int | None = None, filter_thres: float | None = None,
                         temperature: float = 1.0, choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE,
                         cond_scale: float = 1.0, guidance: bool | None = None, order: str = "confidence",
                         init_tokens: Tensor | None = None, progress: bool = False,
                         autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Image token ids ``[len(seeds), image_seq_len]`` for a caption, in ``steps`` parallel decoding steps.

    ``text``: ``[text_seq_len]`` / ``[1, text_seq_len]`` (one caption for every image) or ``[len(seeds),
    text_seq_len]``; it is only read. ``guidance`` (default: ``cond_scale != 1``) runs the null caption alongside.
    ``order``: ``"confidence"`` (MaskGIT) or ``"sequential"`` (unmask in token order). ``init_tokens``: ``[1 or
    len(seeds), image_seq_len]`` ids with ``model.mask_id`` where the model should fill in (inpainting); positions
    given are kept as they are (all given: returned unchanged)."""
    cfg = model.cfg
    n = len(seeds)
    if n < 1:
        raise ValueError("need at least one seed (one image)")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not math.isfinite(choice_temperature) or choice_temperature < 0:
        raise ValueError(f"choice_temperature must be a finite number >= 0, got {choice_temperature}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if init_tokens is None:
        init_tokens = torch.full((1, cfg.image_seq_len), model.mask_id, dtype=torch.long)
    init_tokens = init_tokens.reshape(-1, cfg.image_seq_len).long().cpu()
    if init_tokens.shape[0] not in (1, n):
        raise ValueError(f"init_tokens holds {init_tokens.shape[0]} images for {n} seeds")
    if bool(((init_tokens < 0) | (init_tokens > model.mask_id)).any()):
        raise ValueError(f"init_tokens must be image ids in [0, {model.mask_id}] ({model.mask_id} = [MASK])")
    k = top_k_count(cfg.num_image_tokens, top_k, filter_thres)
    guidance = cond_scale != 1.0 if guidance is None else guidance
    out = torch.empty(n, cfg.image_seq_len, dtype=torch.long)
    with sampling_mode(model, autocast_dtype), tqdm(total=n * steps, desc="sampling", unit="img-step",
                                                    disable=not progress, leave=False) as bar:
        for rows, t, generators in caption_batches(model, text, seeds, batch_size, guidance):
            b = len(rows)
            tokens = (init_tokens.expand(n, -1) if init_tokens.shape[0] == 1 else init_tokens)[rows].to(t.device)
            counts = torch.tensor([mask_schedule(int(m), steps) for m in (tokens == model.mask_id).sum(1).tolist()])
            for s in range(steps):
                if not bool((tokens == model.mask_id).any()):
                    bar.update(b * (steps - s))
                    break
                logits = model.logits(t, torch.cat([tokens, tokens]) if guidance else tokens)
                scores = guided(logits, cond_scale) if guidance else logits
                noise = choice_temperature * (1.0 - (s + 1) / steps)
                tokens = decode_step(scores, tokens, counts[:, s], k, temperature, noise, order, generators)
                bar.update(b)
            out[rows] = tokens.cpu()
    return out
