"""The VQGAN's quantizers, with taming-transformers' key names: nearest-vector (``VectorQuantizer2``) and Gumbel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantizer (taming's VectorQuantizer2, no remapping). Key: ``embedding.weight``.

    Distances are ``||z||^2 + ||e||^2 - 2 z.e`` (argmin); the output passes gradients straight through to ``z``.
    Loss with d = mean((sg[z_q] - z)^2) (commitment) and c = mean((z_q - sg[z])^2) (codebook):
    ``legacy=True`` (taming's default, used by every released VQModel) gives ``d + beta * c``;
    ``legacy=False`` (the VQ-VAE paper's weighting) gives ``beta * d + c``.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @property
    def codebook(self) -> Tensor:
        return self.embedding.weight

    def forward(self, z: Tensor, temperature: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """z [B, D, h, w] -> (z_q [B, D, h, w], loss scalar, indices [B, h, w]); ``temperature`` is ignored."""
        b, d, h, w = z.shape
        z_hwc = z.permute(0, 2, 3, 1)
        flat = z_hwc.reshape(-1, d)
        e = self.embedding.weight
        dist = flat.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * flat @ e.t()
        indices = dist.argmin(dim=1)
        z_q = self.embedding(indices).view(b, h, w, d)
        commit, codebook = F.mse_loss(z_hwc, z_q.detach()), F.mse_loss(z_q, z_hwc.detach())
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z_hwc + (z_q - z_hwc).detach()
        return z_q.permute(0, 3, 1, 2), loss, indices.view(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """indices [B, h, w] -> codebook vectors [B, D, h, w]."""
        return self.embedding(indices).permute(0, 3, 1, 2)


class GumbelQuantize(nn.Module):
    """Gumbel-softmax quantizer (taming's GumbelQuantize, no remapping). Keys: ``proj.{weight,bias}``, ``embed.weight``.

    Training: logits = 1x1 conv; one-hot = gumbel_softmax(logits, temperature, hard=straight_through); z_q = one-hot x
    codebook; loss = kl_weight * KL(softmax(logits) || uniform) (mean over positions).
    Eval: the index is the argmax of the logits **without** Gumbel noise, so encoding is deterministic. taming's own
    eval path keeps the noise (hard sampling), so its indices are random draws and not comparable with ours.

    ``dim_in`` is the width of the quant_conv output (taming builds ``proj`` with ``z_channels`` input channels, which
    only runs when ``z_channels == embed_dim``, as in every released GumbelVQ).
    """

    def __init__(self, dim_in: int, embed_dim: int, n_embed: int, straight_through: bool = True,
                 kl_weight: float = 1e-8, temperature: float = 1.0):
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.straight_through, self.kl_weight, self.temperature = straight_through, kl_weight, temperature
        self.proj = nn.Conv2d(dim_in, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    @property
    def codebook(self) -> Tensor:
        return self.embed.weight

    def forward(self, z: Tensor, temperature: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """z [B, C, h, w] -> (z_q [B, D, h, w], loss scalar, indices [B, h, w])."""
        logits = self.proj(z)
        if self.training:
            tau = self.temperature if temperature is None else temperature
            one_hot = F.gumbel_softmax(logits, tau=tau, dim=1, hard=self.straight_through)
            z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)
            indices = one_hot.argmax(dim=1)
        else:
            indices = logits.argmax(dim=1)
            z_q = self.lookup(indices)
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.n_embed))).sum(dim=1).mean()
        return z_q, self.kl_weight * kl, indices

    def lookup(self, indices: Tensor) -> Tensor:
        """indices [B, h, w] -> codebook vectors [B, D, h, w]."""
        return self.embed(indices).permute(0, 3, 1, 2)
