"""The DALLE transformer: one decoder-only stack over ``[BOS | text tokens | image tokens]``.

Layout of a sequence (``T = text_seq_len``, ``N = image_seq_len``)::

    position   0     1 .. T        T+1 .. T+N
    input      BOS   text ids      image ids
    predicts   t1    t2 .. [img1]  img2 .. (nothing)

Position ``j`` predicts token ``j + 1``: text positions predict text ids through the text head and image positions
image ids through the image head (two output heads, so a text position can never emit an image id and the sampler's
top-k runs over the image vocabulary only). Training drops the last image token from the input.

Positions: a learned 1D table for BOS + text; for the image, learned axial (row + column) embeddings over the token
grid, or a learned 1D table for a gridless tokenizer (``image_fmap_size = 0``, e.g. Styled-VQ's 36 ordered tokens).

Attention goes through ``F.scaled_dot_product_attention``. :meth:`DALLE.logits` is the full causal forward (training,
and the reference the cached path is tested against); :class:`KVCache` + :meth:`DALLE.step` decode one position at a
time over pre-allocated K/V buffers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DALLEConfig:
    num_text_tokens: int = 21128  # text vocabulary size (the Chinese BERT vocab)
    text_seq_len: int = 32  # fixed caption length in tokens (seed: 32)
    num_image_tokens: int = 1024  # image tokenizer codebook size
    image_seq_len: int = 256  # image tokens per image
    image_fmap_size: int = 16  # token-grid side (axial positions); 0 = gridless (1D positions)
    dim: int = 512
    depth: int = 8
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    dropout: float = 0.0  # residual / feed-forward dropout
    attn_dropout: float = 0.0
    loss_img_weight: float = 7.0  # loss = (text CE + w * image CE) / (w + 1)
    tie_embeddings: bool = False  # output heads share the input embedding matrices
    text_pad_id: int = 0  # the tokenizer's [PAD]: a blanked (null) caption is all pad

    def __post_init__(self) -> None:
        for name in ("num_text_tokens", "text_seq_len", "num_image_tokens", "image_seq_len", "dim", "depth", "heads",
                     "dim_head", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_fmap_size and self.image_fmap_size**2 != self.image_seq_len:
            raise ValueError(f"image_fmap_size {self.image_fmap_size} does not give image_seq_len "
                             f"{self.image_seq_len} (a grid has fmap_size**2 tokens)")
        if not 0 <= self.text_pad_id < self.num_text_tokens:
            raise ValueError(f"text_pad_id {self.text_pad_id} outside the text vocabulary")

    @property
    def total_seq_len(self) -> int:
        return 1 + self.text_seq_len + self.image_seq_len

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.heads, self.dim_head, self.attn_dropout = cfg.heads, cfg.dim_head, cfg.attn_dropout
        self.to_qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, H, n, Dh]

    def _out(self, o: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        return self.to_out(o.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None, start: int = 0,
                causal: bool = True) -> Tensor:
        """Causal attention over ``x`` (``causal=False``: every position sees every other, for the masked model;
        uncached only); with ``cache`` (this layer's K/V buffers), ``x`` holds positions ``start .. start + n - 1``
        and attends to everything cached before them too."""
        q, k, v = self._qkv(x)
        drop = self.attn_dropout if self.training else 0.0
        if cache is None:
            return self._out(F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal))
        ck, cv = cache
        n = x.shape[1]
        ck[:, :, start:start + n] = k
        cv[:, :, start:start + n] = v
        k, v = ck[:, :, :start + n], cv[:, :, :start + n]
        if n == 1:  # one new query sees every cached key: no mask needed
            return self._out(F.scaled_dot_product_attention(q, k, v))
        mask = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)
        return self._out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class FeedForward(nn.Module):
    """GEGLU feed-forward (as DALLE-pytorch): dim -> 2 * mult * dim, gate, -> dim."""

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        hidden = cfg.ff_mult * cfg.dim
        self.proj_in = nn.Linear(cfg.dim, 2 * hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.proj_out = nn.Linear(hidden, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.drop(a * F.gelu(gate)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm_ff = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None, start: int = 0,
                causal: bool = True) -> Tensor:
        x = x + self.drop(self.attn(self.norm_attn(x), cache, start, causal))
        return x + self.drop(self.ff(self.norm_ff(x)))


class KVCache:
    """Pre-allocated keys and values of every layer for ``batch`` sequences of up to ``total_seq_len`` positions."""

    def __init__(self, cfg: DALLEConfig, batch: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, cfg.heads, cfg.total_seq_len, cfg.dim_head)
        self.layers = [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
                       for _ in range(cfg.depth)]
        self.length = 0  # positions filled so far


class DALLE(nn.Module):
    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.cfg = cfg
        self.text_emb = nn.Embedding(cfg.num_text_tokens, cfg.dim)
        self.image_emb = nn.Embedding(cfg.num_image_tokens, cfg.dim)
        self.bos = nn.Parameter(torch.zeros(cfg.dim))
        self.text_pos_emb = nn.Embedding(cfg.text_seq_len + 1, cfg.dim)  # BOS + text
        self.build_stack(cfg)
        self.to_text_logits = nn.Linear(cfg.dim, cfg.num_text_tokens, bias=not cfg.tie_embeddings)
        self.to_image_logits = nn.Linear(cfg.dim, cfg.num_image_tokens, bias=not cfg.tie_embeddings)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.to_text_logits.weight = self.text_emb.weight
            self.to_image_logits.weight = self.image_emb.weight
        self.scale_residuals()

    def build_stack(self, cfg: DALLEConfig) -> None:
        """The image position tables (axial row + column over a grid, else 1D), dropout, the blocks and the output
        norm: what this model and :class:`dalle_train.masked.MaskedDALLE` share, in this order."""
        if cfg.image_fmap_size:
            self.image_row_emb = nn.Embedding(cfg.image_fmap_size, cfg.dim)
            self.image_col_emb = nn.Embedding(cfg.image_fmap_size, cfg.dim)
        else:
            self.image_pos_emb = nn.Embedding(cfg.image_seq_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)

    def scale_residuals(self) -> None:
        """GPT-2 style: the residual projections of every block initialised with std 0.02 / sqrt(2 depth)."""
        for block in self.blocks:
            for lin in (block.attn.to_out, block.ff.proj_out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.cfg.depth))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- embeddings ---------------------------------------------------------------------------------------------------
    def image_positions(self) -> Tensor:
        """[image_seq_len, dim] position embeddings of the image tokens (row-major over the grid)."""
        cfg = self.cfg
        if cfg.image_fmap_size:
            return (self.image_row_emb.weight[:, None] + self.image_col_emb.weight[None, :]).reshape(
                cfg.image_seq_len, cfg.dim)
        return self.image_pos_emb.weight

    def embed_prefix(self, text: Tensor) -> Tensor:
        """[B, T] text ids -> [B, 1 + T, dim] (BOS + text, with positions)."""
        b = text.shape[0]
        x = torch.cat([self.bos.expand(b, 1, -1), self.text_emb(text)], dim=1)
        return x + self.text_pos_emb.weight[: x.shape[1]]

    def embed_image(self, image: Tensor, start: int = 0) -> Tensor:
        """[B, n] image ids at image positions ``start .. start + n - 1`` -> [B, n, dim]."""
        return self.image_emb(image) + self.image_positions()[start:start + image.shape[1]]

    def _check_text(self, text: Tensor) -> None:
        if text.ndim != 2 or text.shape[1] != self.cfg.text_seq_len:
            raise ValueError(f"text must be [B, {self.cfg.text_seq_len}] ids, got {tuple(text.shape)}")

    # -- full forward (training) --------------------------------------------------------------------------------------
    def hidden(self, text: Tensor, image: Tensor | None = None) -> Tensor:
        """Final normed hidden states of ``[BOS | text | image]`` (uncached causal forward)."""
        self._check_text(text)
        x = self.embed_prefix(text)
        if image is not None and image.shape[1]:
            x = torch.cat([x, self.embed_image(image)], dim=1)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x)

    def logits(self, text: Tensor, image: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits of every prediction: text logits ``[B, T, num_text_tokens]`` (predicting text ids 1..T from
        positions 0..T-1) and image logits ``[B, n + 1, num_image_tokens]`` for ``image`` of ``n`` tokens (position
        T predicts the first image token)."""
        h = self.hidden(text, image)
        t = self.cfg.text_seq_len
        return self.to_text_logits(h[:, :t]), self.to_image_logits(h[:, t:])

    def forward(self, text: Tensor, image: Tensor, null_cond_prob: float = 0.0) -> tuple[Tensor, dict[str, float]]:
        """Training loss on full captions + full image token sequences.

        ``null_cond_prob``: the caption of that fraction of the batch (drawn per row) is replaced by an all-pad null
        caption, so the model also learns p(image | no text) for classifier-free guidance."""
        cfg = self.cfg
        if image.ndim != 2 or image.shape[1] != cfg.image_seq_len:
            raise ValueError(f"image must be [B, {cfg.image_seq_len}] token ids, got {tuple(image.shape)}")
        if null_cond_prob > 0:
            drop = torch.rand(text.shape[0], device=text.device) < null_cond_prob
            text = torch.where(drop[:, None], torch.full_like(text, cfg.text_pad_id), text)
        text_logits, image_logits = self.logits(text, image[:, :-1])
        loss_text = F.cross_entropy(text_logits.reshape(-1, cfg.num_text_tokens).float(), text.reshape(-1))
        loss_img = F.cross_entropy(image_logits.reshape(-1, cfg.num_image_tokens).float(), image.reshape(-1))
        w = cfg.loss_img_weight
        loss = (loss_text + w * loss_img) / (w + 1)
        return loss, {"loss_text": float(loss_text.detach()), "loss_img": float(loss_img.detach())}

    # -- cached decoding ------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = self.text_emb.weight
        return KVCache(self.cfg, batch, device or p.device, dtype or p.dtype)

    def _run_cached(self, x: Tensor, cache: KVCache) -> Tensor:
        start = cache.length
        for block, kv in zip(self.blocks, cache.layers, strict=True):
            x = block(x, kv, start)
        cache.length = start + x.shape[1]
        return self.norm_out(x[:, -1])

    def prefill(self, text: Tensor, cache: KVCache) -> Tensor:
        """Run BOS + text once into an empty cache; returns the logits of the first image token
        [B, num_image_tokens]."""
        self._check_text(text)
        if cache.length:
            raise ValueError("prefill needs an empty cache")
        return self.to_image_logits(self._run_cached(self.embed_prefix(text), cache))

    def step(self, token: Tensor, cache: KVCache) -> Tensor:
        """Append one image token per row ([B]) and return the logits of the next one [B, num_image_tokens]."""
        index = cache.length - 1 - self.cfg.text_seq_len  # image position of ``token``
        if not 0 <= index < self.cfg.image_seq_len - 1:
            raise ValueError(f"cache holds {cache.length} positions: no image token left to predict")
        return self.to_image_logits(self._run_cached(self.embed_image(token[:, None], index), cache))
