"""Styled-VQ: an image tokenizer of T ordered attribute tokens (36 by default), batch-first.

Encoder: patch conv, a learned class token and positions, T learned query tokens appended, dense pre-LN ViT blocks,
then "expert" blocks in which each query token has its own MLP (the class and patch tokens share one), a final LN
and a projection to ``emb_dim``. Bottleneck v1: L2-normalised tokens (plus multiplicative noise while training);
v2: soft mixing of ``emb_dim`` prototypes followed by LayerNorm. Decoder: learned position queries, condition blocks
that read ``tokens_per_block`` tokens each through adaptive LayerNorm (``alpha * LN(x) + beta``) and attention
(v1: learned placeholder slots; v2: zero slots added per block), plain blocks, a linear head, unpatchify and a conv
refiner. Stage 2 quantises the continuous tokens to a frozen k-means codebook (squared L2, straight-through).

Implements the ImageTokenizer protocol: ``encode`` [0, 1] images -> LongTensor [B, T], ``decode`` -> [0, 1] images,
``num_tokens`` (codebook size), ``image_size``, ``seq_len`` (= T) and ``fmap_size`` (0: the tokens have no grid).
No file I/O here; the original checkpoint format is read by ``styled_vq/convert.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class StyledVQConfig:
    """Every size of the model. Defaults are the original full size (about 2.36 B parameters)."""

    version: str = "v2"  # v1: L2 norm (+ noise) and learned placeholder slots; v2: prototypes + LN and zero slots
    image_size: int = 256
    patch_size: int = 16
    width: int = 1024  # encoder width
    heads: int = 16  # encoder attention heads
    mlp_ratio: float = 4.0
    dense_blocks: int = 18
    expert_blocks: int = 6
    tokens_per_block: int = 2  # tokens read by each decoder condition block
    cond_blocks: int = 18  # number of tokens = tokens_per_block * cond_blocks
    emb_dim: int = 128  # token dimension (the information bottleneck)
    decoder_width: int = 768
    decoder_heads: int = 0  # 0: decoder_width // 64 (the original), at least 1
    final_blocks: int = 6
    refiner_channels: int = 32
    refiner_groups: int = 8
    refiner_kernel: int = 0  # 0: patch_size + 1 (17 at patch 16)
    codebook_size: int = 194_560
    noise: float = 0.0  # v1 only: multiplicative Gaussian noise scale applied in training (z = mu + s * eps * mu)

    def __post_init__(self) -> None:
        if self.version not in ("v1", "v2"):
            raise ValueError(f"version must be v1 or v2, got {self.version!r}")
        for name in ("image_size", "patch_size", "width", "heads", "dense_blocks", "tokens_per_block", "cond_blocks",
                     "emb_dim", "decoder_width", "refiner_channels", "refiner_groups", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("expert_blocks", "final_blocks", "decoder_heads", "refiner_kernel"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mlp_ratio <= 0 or self.noise < 0:
            raise ValueError("mlp_ratio must be > 0 and noise >= 0")
        if self.noise > 0 and self.version != "v1":
            raise ValueError("noise applies to the v1 bottleneck only")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.decoder_width % self.dec_heads:
            raise ValueError(f"decoder_width {self.decoder_width} is not divisible by {self.dec_heads} heads")
        if self.refiner_channels % self.refiner_groups:
            raise ValueError(f"refiner_channels {self.refiner_channels} not divisible by groups {self.refiner_groups}")
        if self.kernel % 2 == 0:
            raise ValueError(f"refiner_kernel must be odd, got {self.kernel}")

    @property
    def seq_len(self) -> int:
        return self.tokens_per_block * self.cond_blocks

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def dec_heads(self) -> int:
        return self.decoder_heads or max(1, self.decoder_width // 64)

    @property
    def kernel(self) -> int:
        return self.refiner_kernel or self.patch_size + 1

    def to_dict(self) -> dict:
        return asdict(self)


# Named sizes: "full" is the original; the tiny ones are the spec's 2-core-CPU configurations.
_TINY = {"image_size": 32, "patch_size": 4, "width": 64, "heads": 4, "dense_blocks": 2, "expert_blocks": 1,
         "emb_dim": 16, "decoder_width": 64, "final_blocks": 1, "refiner_channels": 8, "refiner_groups": 2,
         "refiner_kernel": 5, "codebook_size": 64}
PRESETS: dict[str, dict] = {
    "full": {},
    "tiny36": _TINY,
    "tiny36-64px": {**_TINY, "image_size": 64, "patch_size": 8, "refiner_kernel": 9},
    "micro8": {**_TINY, "cond_blocks": 4},
    "small": {**_TINY, "width": 128, "dense_blocks": 3, "emb_dim": 32, "decoder_width": 96, "decoder_heads": 2,
              "codebook_size": 512},
}


def preset(name: str, **overrides) -> StyledVQConfig:
    """A named configuration, optionally with some fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown Styled-VQ preset {name!r} (known: {', '.join(PRESETS)})")
    return StyledVQConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------------------------------
# building blocks


class Attention(nn.Module):
    """Multi-head self-attention (SDPA); ``qkv`` / ``proj`` are nn.MultiheadAttention's in_proj / out_proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.qkv.weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ExpertMLPs(nn.Module):
    """One MLP per query token, applied as two batched matmuls. Weights are stacked per token ([T, out, in], the
    layout of T nn.Linear weights); biases are kept flat ([T * out]) so the runtime's no-decay rule (1-D) applies."""

    def __init__(self, tokens: int, dim: int, hidden: int):
        super().__init__()
        self.tokens, self.dim, self.hidden = tokens, dim, hidden
        self.fc_weight = nn.Parameter(torch.empty(tokens, hidden, dim))
        self.fc_bias = nn.Parameter(torch.empty(tokens * hidden))
        self.proj_weight = nn.Parameter(torch.empty(tokens, dim, hidden))
        self.proj_bias = nn.Parameter(torch.empty(tokens * dim))
        for w, b, fan_in in ((self.fc_weight, self.fc_bias, dim), (self.proj_weight, self.proj_bias, hidden)):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.einsum("btd,thd->bth", x, self.fc_weight) + self.fc_bias.view(self.tokens, self.hidden)
        return torch.einsum("bth,tdh->btd", F.gelu(h), self.proj_weight) + self.proj_bias.view(self.tokens, self.dim)


class ExpertBlock(Block):
    """Shared attention over all tokens; the class/patch tokens share ``mlp``, query token i uses expert i."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, tokens: int):
        super().__init__(dim, heads, mlp_ratio)
        self.experts = ExpertMLPs(tokens, dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        t = self.experts.tokens
        return x + torch.cat([self.mlp(h[:, :-t]), self.experts(h[:, -t:])], dim=1)


class AdaLayerNorm(nn.Module):
    """``alpha * LN(x) + beta`` with ``[alpha, beta] = Linear(SiLU(e))``: the scale is alpha, not 1 + alpha."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        alpha, beta = self.linear(F.silu(e)).unsqueeze(1).chunk(2, dim=-1)
        return alpha * self.norm(x) + beta


class CondBlock(nn.Module):
    """A decoder block that reads k = ``tokens`` condition tokens.

    v2: h = AdaLN1(x, LN(c_0)); k zero slots are prepended to x and the LN-ed conditions to h; x += attn(h);
    x += mlp(AdaLN2(x, LN(c_last))). v1: the conditions are added to the block's k placeholder slots of x, then
    h = AdaLN1(x, LN(W1 x[slot 0] + c_0)); x += attn(h); x += mlp(AdaLN2(x, LN(W2 x[slot last] + c_last))).
    """

    def __init__(self, version: str, dim: int, heads: int, mlp_ratio: float, tokens: int):
        super().__init__()
        self.version, self.tokens = version, tokens
        self.attn = Attention(dim, heads)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm1 = AdaLayerNorm(dim)
        self.norm2 = AdaLayerNorm(dim)
        if version == "v2":
            self.cond_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(tokens))
        else:
            self.slot_proj_1 = nn.Linear(dim, dim)
            self.slot_proj_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor, c: Tensor, index: int) -> Tensor:
        k = self.tokens
        if self.version == "v2":
            h = self.norm1(x, self.ln_1(c[:, 0]))
            x = torch.cat([x.new_zeros(x.shape[0], k, x.shape[2]), x], dim=1)
            h = torch.cat([*(norm(c[:, i:i + 1]) for i, norm in enumerate(self.cond_norms)), h], dim=1)
            x = x + self.attn(h)
            return x + self.mlp(self.norm2(x, self.ln_2(c[:, -1])))
        s = index * k
        x = torch.cat([x[:, :s], x[:, s:s + k] + c, x[:, s + k:]], dim=1)
        h = self.norm1(x, self.ln_1(self.slot_proj_1(x[:, s]) + c[:, 0]))
        x = x + self.attn(h)
        return x + self.mlp(self.norm2(x, self.ln_2(self.slot_proj_2(x[:, s + k - 1]) + c[:, -1])))


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Refiner(nn.Module):
    """Pixel-space conv head: conv(k) -> GN -> ResBlock -> GN -> SiLU -> conv3x3; no output activation."""

    def __init__(self, channels: int, groups: int, kernel: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, kernel, padding=kernel // 2)
        self.norm_in = nn.GroupNorm(groups, channels, eps=1e-6)
        self.res = ResBlock(channels, groups)
        self.norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.res(self.norm_in(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(x)))


# ---------------------------------------------------------------------------------------------------------------------
# encoder, bottleneck, decoder


class _Checkpointed(nn.Module):
    """Runs its blocks under activation checkpointing when ``grad_checkpointing`` is on and gradients are needed."""

    grad_checkpointing: bool = False

    def _run(self, block: nn.Module, *args) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class Encoder(_Checkpointed):
    def __init__(self, cfg: StyledVQConfig):
        super().__init__()
        w, scale = cfg.width, cfg.width ** -0.5
        self.tokens = cfg.seq_len
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        self.cls_embed = nn.Parameter(scale * torch.randn(1, w))
        self.pos_embed = nn.Parameter(scale * torch.randn(1 + cfg.grid ** 2, w))
        self.query_embed = nn.Parameter(scale * torch.randn(cfg.seq_len, w))
        self.ln_pre = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.dense_blocks))
        self.expert_blocks = nn.ModuleList(ExpertBlock(w, cfg.heads, cfg.mlp_ratio, cfg.seq_len)
                                           for _ in range(cfg.expert_blocks))
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.emb_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> the projected query tokens [B, T, E] (before the bottleneck head)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, P, W], raster order
        b = x.shape[0]
        x = torch.cat([self.cls_embed.expand(b, -1, -1), x], dim=1) + self.pos_embed
        x = self.ln_pre(torch.cat([x, self.query_embed.expand(b, -1, -1)], dim=1))
        for block in [*self.blocks, *self.expert_blocks]:
            x = self._run(block, x)
        return self.proj(self.ln_post(x[:, -self.tokens:]))


class Bottleneck(nn.Module):
    """v1: unit-norm tokens; v2: LN(sum_k w_k V_k) with w_k = (cos(mu, V_k) + 1) / sum_j (cos(mu, V_j) + 1)."""

    def __init__(self, cfg: StyledVQConfig):
        super().__init__()
        self.version = cfg.version
        if cfg.version == "v2":
            self.proto_embed = nn.Parameter(cfg.width ** -0.5 * torch.randn(cfg.emb_dim, cfg.emb_dim))
            self.ln = nn.LayerNorm(cfg.emb_dim)

    def forward(self, mu: Tensor) -> Tensor:
        if self.version == "v1":
            return F.normalize(mu.float(), dim=-1)
        a = F.normalize(mu.float(), dim=-1) @ F.normalize(self.proto_embed.float(), dim=-1).T + 1
        return self.ln((a / a.sum(-1, keepdim=True)) @ self.proto_embed.float())


class Decoder(_Checkpointed):
    def __init__(self, cfg: StyledVQConfig):
        super().__init__()
        d, k = cfg.decoder_width, cfg.tokens_per_block
        self.patch, self.grid, self.tokens_per_block = cfg.patch_size, cfg.grid, k
        slots = cfg.seq_len if cfg.version == "v1" else 0  # v1: learned placeholder slots before the positions
        self.pos_embed = nn.Parameter(d ** -0.5 * torch.randn(slots + cfg.grid ** 2, d))
        self.ln_pre = nn.LayerNorm(d)
        self.cond_blocks = nn.ModuleList(CondBlock(cfg.version, d, cfg.dec_heads, cfg.mlp_ratio, k)
                                         for _ in range(cfg.cond_blocks))
        self.final_blocks = nn.ModuleList(Block(d, cfg.dec_heads, cfg.mlp_ratio) for _ in range(cfg.final_blocks))
        self.ln_post = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3 * cfg.patch_size ** 2)
        self.refiner = Refiner(cfg.refiner_channels, cfg.refiner_groups, cfg.kernel)

    def forward(self, c: Tensor) -> Tensor:
        """Conditions [B, T, D] -> images [B, 3, H, W] in [-1, 1] space (not clamped)."""
        b, k = c.shape[0], self.tokens_per_block
        x = self.ln_pre(self.pos_embed).expand(b, -1, -1)
        for i, block in enumerate(self.cond_blocks):
            x = self._run(block, x, c[:, i * k:(i + 1) * k], i)
        for block in self.final_blocks:
            x = self._run(block, x)
        g, p = self.grid, self.patch
        x = self.head(self.ln_post(x[:, -g * g:]))  # [B, P, 3*p*p], channels first inside a patch
        x = x.view(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)
        return self.refiner(x)


# ---------------------------------------------------------------------------------------------------------------------
# the tokenizer


class StyledVQ(nn.Module):
    """The Styled-VQ tokenizer. Stage 1 has no codebook (``codebook`` is empty); :meth:`set_codebook` makes it a
    stage-2 model that can :meth:`encode` to indices. The codebook is frozen (``requires_grad=False``)."""

    fmap_size = 0  # no token grid: DALLE uses a 1-D position for gridless tokenizers

    def __init__(self, cfg: StyledVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.bottleneck = Bottleneck(cfg)
        self.up_proj = nn.Linear(cfg.emb_dim, cfg.decoder_width)
        self.decoder = Decoder(cfg)
        self.codebook = nn.Parameter(torch.zeros(0, cfg.emb_dim), requires_grad=False)

    # -- protocol attributes -------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, meta: dict, state_dict: dict) -> StyledVQ:
        """Rebuild a trained model from a checkpoint's ``meta`` (``{"kind": "styled_vq", "config": {...}}``) and its
        weights (stage 1, or stage 2 with its codebook), in eval mode."""
        model = cls(StyledVQConfig(**meta["config"]))
        codebook = state_dict.get("codebook")
        if codebook is not None and codebook.ndim == 2 and codebook.shape[0] > 0:
            model.set_codebook(torch.zeros_like(codebook, dtype=torch.float32))
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    @property
    def num_tokens(self) -> int:
        return self.cfg.codebook_size

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    @property
    def has_codebook(self) -> bool:
        return self.codebook.shape[0] > 0

    def checkpoint_meta(self) -> dict:
        """What rebuilds this model from its weights (see :meth:`from_checkpoint`)."""
        return {"kind": "styled_vq", "config": self.cfg.to_dict(), "stage": 2 if self.has_codebook else 1,
                "image_size": self.cfg.image_size}

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = enabled

    @torch.no_grad()
    def set_codebook(self, centres: Tensor) -> None:
        """Install k-means centres [K, emb_dim]; ``cfg.codebook_size`` becomes K."""
        if centres.ndim != 2 or centres.shape[1] != self.cfg.emb_dim or centres.shape[0] < 1:
            raise ValueError(f"codebook must have shape [K, {self.cfg.emb_dim}], got {tuple(centres.shape)}")
        if not torch.isfinite(centres).all():
            raise ValueError("codebook holds NaN/inf values")
        self.codebook = nn.Parameter(centres.detach().to(self.up_proj.weight.device, torch.float32).clone(),
                                     requires_grad=False)
        self.cfg = replace(self.cfg, codebook_size=int(centres.shape[0]))

    # -- continuous path -----------------------------------------------------------------------------------------
    def encode_continuous(self, images: Tensor) -> Tensor:
        """Images in [0, 1], [B, 3, H, W] -> continuous tokens [B, T, E] (no training noise)."""
        _check_images(images, self.cfg.image_size)
        return self.bottleneck(self.encoder(images * 2 - 1))

    def decode_raw(self, z: Tensor) -> Tensor:
        """Continuous tokens [B, T, E] -> reconstruction in [-1, 1] space, not clamped (what the losses see)."""
        if z.ndim != 3 or z.shape[1:] != (self.cfg.seq_len, self.cfg.emb_dim):
            raise ValueError(f"expected tokens [B, {self.cfg.seq_len}, {self.cfg.emb_dim}], got {tuple(z.shape)}")
        return self.decoder(self.up_proj(z.to(self.up_proj.weight.dtype))).float()

    def decode_continuous(self, z: Tensor) -> Tensor:
        """Continuous tokens [B, T, E] -> images in [0, 1] (clamped)."""
        return ((self.decode_raw(z) + 1) / 2).clamp(0, 1)

    def forward(self, images: Tensor, quantize: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Training pass: (reconstruction in [-1, 1] space, continuous tokens, indices or None). v1 adds its
        multiplicative noise in training mode; ``quantize`` uses the codebook with the straight-through estimator."""
        z = self.encode_continuous(images)
        if self.training and self.cfg.version == "v1" and self.cfg.noise > 0:
            z = z + self.cfg.noise * torch.randn_like(z) * z.detach()
        indices = None
        if quantize:
            zq, indices = self.quantize(z)
            z = z + (zq - z).detach()
        return self.decode_raw(z), z, indices

    # -- codebook ------------------------------------------------------------------------------------------------
    def _require_codebook(self) -> None:
        if not self.has_codebook:
            raise ValueError("this Styled-VQ model has no codebook yet (stage 1): build one with `python -m styled_vq "
                            "kmeans` and attach it (`python -m styled_vq attach`) before encoding to indices")

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest codebook entries (squared L2, fp32): (entries [B, T, E], indices [B, T])."""
        self._require_codebook()
        idx = nearest(z.reshape(-1, z.shape[-1]), self.codebook)
        return self.codebook[idx].view(z.shape), idx.view(z.shape[:-1])

    # -- ImageTokenizer protocol ---------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> token indices LongTensor [B, T] (eval mode, no gradients)."""
        self._require_codebook()
        with _inference(self):
            return self.quantize(self.encode_continuous(images))[1]

    def decode(self, indices: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Token indices [B, T] -> images in [0, 1] (eval mode, no gradients). ``grid`` must be None (no grid)."""
        self._require_codebook()
        if grid is not None:
            raise ValueError("Styled-VQ tokens have no spatial grid; decode takes no grid")
        if indices.ndim != 2 or indices.shape[1] != self.seq_len:
            raise ValueError(f"expected indices [B, {self.seq_len}], got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook.shape[0]):
            raise ValueError(f"indices must lie in [0, {self.codebook.shape[0]})")
        with _inference(self):
            return self.decode_continuous(self.codebook[indices.long()])


def nearest(x: Tensor, codebook: Tensor, max_elements: int = 1 << 26) -> Tensor:
    """Index of the nearest row of ``codebook`` [K, E] for every row of ``x`` [N, E] (squared L2 in fp32, chunked so
    that at most ``max_elements`` distances exist at once)."""
    x, cb = x.float(), codebook.float()
    cb_sq = (cb * cb).sum(1)
    step = max(1, max_elements // max(1, cb.shape[0]))
    out = [torch.addmm(cb_sq, x[i:i + step], cb.T, alpha=-2).argmin(1) for i in range(0, x.shape[0], step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


@contextlib.contextmanager
def _inference(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients, the training flag restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _check_images(images: Tensor, size: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
        raise ValueError(f"expected images [B, 3, {size}, {size}] in [0, 1], got {tuple(images.shape)}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
