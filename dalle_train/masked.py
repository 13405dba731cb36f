"""The masked image-token generator (MaskGIT / Muse style): one bidirectional stack over ``[text | image tokens]``.

Layout of a sequence (``T = text_seq_len``, ``N = image_seq_len``)::

    position   0 .. T-1     T .. T+N-1
    input      text ids     image ids, some replaced by [MASK] (id ``num_image_tokens``)
    predicts   (nothing)    the image id at every position (the loss counts the masked ones only)

The same building blocks as :class:`dalle_train.model.DALLE` (its config, pre-LN :class:`Block` with GEGLU, the
Chinese text embedding with ``text_pad_id`` null captions, learned axial row + column positions over a token grid or
a 1D table for a gridless tokenizer such as Styled-VQ's 36 ordered tokens), but the attention is not causal, there is
no BOS and no text head, and the image embedding has one extra row: ``[MASK]``. The output head covers the
``num_image_tokens`` real ids only, so ``[MASK]`` can never be predicted or sampled. ``loss_img_weight`` is not used.

Training (:meth:`MaskedDALLE.forward`): per image, a masked ratio ``r = cos(pi/2 * u)``, ``u ~ U(0, 1)`` (MaskGIT's
cosine schedule), ``ceil(r * N)`` positions (at least one) drawn uniformly are replaced by ``[MASK]``; the loss is the
cross-entropy on the masked positions. ``null_cond_prob`` blanks captions as DALLE does (classifier-free guidance).
Sampling: :mod:`dalle_train.masked_sample`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_train.model import DALLE, DALLEConfig


def masked_count(ratio: float, n: int) -> int:
    """How many of ``n`` tokens a masked ratio masks: ``ceil(ratio * n)``, at least one and at most ``n``."""
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def random_mask(batch: int, n: int, generator: torch.Generator | None = None, device: torch.device | None = None,
                ) -> Tensor:
    """A ``[batch, n]`` bool mask drawn with the cosine schedule: row ``b`` masks ``ceil(cos(pi/2 * u_b) * n)``
    (at least one) positions chosen uniformly at random, ``u_b ~ U(0, 1)``. Drawn on the CPU (from ``generator``
    when given, so an evaluation can be repeatable), then moved to ``device``."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    counts = torch.tensor([masked_count(math.cos(math.pi / 2 * float(x)), n) for x in u])
    ranks = torch.rand(batch, n, generator=generator).argsort(dim=-1).argsort(dim=-1)
    return (ranks < counts[:, None]).to(device)


class MaskedDALLE(nn.Module):
    """Bidirectional transformer over ``[text | image]`` predicting the image ids at ``[MASK]`` positions."""

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.cfg = cfg
        self.mask_id = cfg.num_image_tokens
        self.text_emb = nn.Embedding(cfg.num_text_tokens, cfg.dim)
        self.image_emb = nn.Embedding(cfg.num_image_tokens + 1, cfg.dim)  # + [MASK]
        self.text_pos_emb = nn.Embedding(cfg.text_seq_len, cfg.dim)
        self.build_stack(cfg)
        if cfg.tie_embeddings:  # the real ids' rows of the input embedding, plus a bias
            self.image_logits_bias = nn.Parameter(torch.zeros(cfg.num_image_tokens))
        else:
            self.to_image_logits = nn.Linear(cfg.dim, cfg.num_image_tokens)
        self.apply(DALLE._init)
        self.scale_residuals()

    build_stack, scale_residuals, image_positions = DALLE.build_stack, DALLE.scale_residuals, DALLE.image_positions
    _check_text = DALLE._check_text

    @property
    def total_seq_len(self) -> int:
        return self.cfg.text_seq_len + self.cfg.image_seq_len

    def _check_image(self, image: Tensor) -> None:
        if image.ndim != 2 or image.shape[1] != self.cfg.image_seq_len:
            raise ValueError(f"image must be [B, {self.cfg.image_seq_len}] token ids, got {tuple(image.shape)}")

    def image_logits(self, h: Tensor) -> Tensor:
        if self.cfg.tie_embeddings:
            return F.linear(h, self.image_emb.weight[: self.cfg.num_image_tokens], self.image_logits_bias)
        return self.to_image_logits(h)

    def logits(self, text: Tensor, image: Tensor) -> Tensor:
        """``[B, N, num_image_tokens]`` logits at every image position for ``text`` ``[B, T]`` and ``image``
        ``[B, N]`` (ids in ``0 .. num_image_tokens``, the last one being ``[MASK]``)."""
        self._check_text(text)
        self._check_image(image)
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"{text.shape[0]} captions for {image.shape[0]} images")
        x = torch.cat([self.text_emb(text) + self.text_pos_emb.weight,
                       self.image_emb(image) + self.image_positions()], dim=1)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, causal=False)
        return self.image_logits(self.norm_out(x[:, self.cfg.text_seq_len:]))

    def forward(self, text: Tensor, image: Tensor, null_cond_prob: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Training loss: cross-entropy on the positions masked by :func:`random_mask` (``generator``: a CPU
        generator for a repeatable mask, e.g. the validation loss). ``null_cond_prob`` as :meth:`DALLE.forward`."""
        cfg = self.cfg
        self._check_image(image)
        if bool(((image < 0) | (image >= cfg.num_image_tokens)).any()):
            raise ValueError(f"image ids must be in [0, {cfg.num_image_tokens}) (training targets are real ids)")
        if null_cond_prob > 0:
            drop = torch.rand(text.shape[0], device=text.device) < null_cond_prob
            text = torch.where(drop[:, None], torch.full_like(text, cfg.text_pad_id), text)
        mask = random_mask(image.shape[0], cfg.image_seq_len, generator, image.device)
        logits = self.logits(text, image.masked_fill(mask, self.mask_id))
        loss = F.cross_entropy(logits[mask].float(), image[mask])
        return loss, {"loss_img": float(loss.detach()), "mask_ratio": float(mask.float().mean())}
