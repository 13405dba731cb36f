"""taming-transformers' VQGAN (``VQModel`` / ``GumbelVQ`` minus its ``loss.*`` submodule), with taming's exact key
names so its state dicts load with ``strict=True``. It works in [-1, 1] internally; foreign checkpoints are read in
:mod:`vae_train.convert`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from vae_train.protocol import GridSizes, check_images, inference, token_grid
from vae_train.quantizers import GumbelQuantize, VectorQuantizer


@dataclass
class VQGANConfig:
    """taming ``VQModel`` / ``GumbelVQ`` parameters: ``embed_dim``, ``n_embed``, the ``ddconfig`` fields flattened, and
    the quantizer. Defaults are taming's ImageNet f16 / 1024-code model (``configs/imagenet_vqgan.yaml``)."""

    embed_dim: int = 256  # codebook vector width
    n_embed: int = 1024  # codebook size
    # ddconfig
    z_channels: int = 256
    resolution: int = 256  # decides where attention sits (attn_resolutions), not the input size
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # len(ch_mult) - 1 downsamples
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    double_z: bool = False  # kept for config compatibility; VQModel only works with False
    resamp_with_conv: bool = True  # conv in the down/upsamplers (avg-pool / plain nearest upsample when False)
    # quantizer
    quantizer: str = "vq"  # "vq" (VectorQuantizer2) | "gumbel" (GumbelQuantize)
    beta: float = 0.25  # vq: weight in the codebook/commitment loss
    legacy_loss: bool = True  # vq: taming's default (legacy=True) term weighting, see VectorQuantizer
    kl_weight: float = 1e-8  # gumbel: weight of KL(q || uniform) (GumbelVQ's default)
    temperature: float = 1.0  # gumbel: softmax temperature in training (taming anneals it from 1.0)
    straight_through: bool = True  # gumbel: hard one-hot forward in training

    def __post_init__(self) -> None:
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)
        if self.quantizer not in ("vq", "gumbel"):
            raise ValueError(f"quantizer must be 'vq' or 'gumbel', got {self.quantizer!r}")
        if self.double_z:
            raise ValueError("double_z=True is for KL autoencoders; taming's VQModel needs double_z=False")
        if not self.ch_mult:
            raise ValueError("ch_mult must not be empty")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths):
            raise ValueError(f"every ch * ch_mult[i] must be divisible by 32 (GroupNorm(32)), got {widths}")

    def ddconfig(self) -> dict:
        """The taming ``ddconfig`` dict (as in a ``model.yaml``)."""
        keys = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                "attn_resolutions", "dropout")
        d = {k: getattr(self, k) for k in keys}
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    def to_dict(self) -> dict:
        return asdict(self)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm - swish - 3x3 conv - GroupNorm - swish - dropout - 3x3 conv, plus a (1x1-projected) skip."""

    def __init__(self, dim_in: int, dim_out: int | None = None, dropout: float = 0.0):
        super().__init__()
        dim_out = dim_in if dim_out is None else dim_out
        self.norm1 = _group_norm(dim_in)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm2 = _group_norm(dim_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = _group_norm(dim)
        self.q = nn.Conv2d(dim, dim, 1)
        self.k = nn.Conv2d(dim, dim, 1)
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))  # [B,1,HW,C]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one, then a 3x3 stride-2 conv (or 2x2 average pooling)."""

    def __init__(self, dim: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=0) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, dim: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks), ``attn`` (empty or one per block), optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class _Mid(nn.Module):
    """res block - attention - res block at the lowest resolution."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(dim, dim, dropout)
        self.attn_1 = AttnBlock(dim)
        self.block_2 = ResnetBlock(dim, dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """taming's Encoder: conv_in, ``down.{i}`` levels (attention where ``resolution / 2**i`` is in
    ``attn_resolutions``; a downsampler on all but the last), mid, GroupNorm - swish - conv_out to ``z_channels``."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = False, dropout: float = 0.0,
                 resamp_with_conv: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        dim_in = ch
        for i, mult in enumerate(ch_mult):
            dim_out, res = ch * mult, resolution // 2**i
            blocks = [ResnetBlock(dim_in if j == 0 else dim_out, dim_out, dropout) for j in range(num_res_blocks)]
            attns = [AttnBlock(dim_out) for _ in range(num_res_blocks)] if res in attn_resolutions else []
            level = _Level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(dim_out, resamp_with_conv)
            self.down.append(level)
            dim_in = dim_out
        self.mid = _Mid(dim_in, dropout)
        self.norm_out = _group_norm(dim_in)
        self.conv_out = nn.Conv2d(dim_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """taming's Decoder: conv_in from ``z_channels``, mid, ``up.{i}`` levels run from the deepest to ``up.0``
    (num_res_blocks + 1 blocks each, an upsampler on all but ``up.0``), GroupNorm - swish - conv_out to ``out_ch``."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 out_ch: int, resolution: int, z_channels: int, dropout: float = 0.0, resamp_with_conv: bool = True,
                 **_ignored):
        super().__init__()
        n = len(ch_mult)
        dim_mid = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, dim_mid, 3, padding=1)
        self.mid = _Mid(dim_mid, dropout)
        levels = []
        for i, mult in enumerate(ch_mult):
            dim_in = ch * ch_mult[i + 1] if i < n - 1 else dim_mid  # what the level below (deeper) hands up
            dim_out, res = ch * mult, resolution // 2**i
            blocks = [ResnetBlock(dim_in if j == 0 else dim_out, dim_out, dropout) for j in range(num_res_blocks + 1)]
            attns = [AttnBlock(dim_out) for _ in range(num_res_blocks + 1)] if res in attn_resolutions else []
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(dim_out, resamp_with_conv)
            levels.append(level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(ch * ch_mult[0])
        self.conv_out = nn.Conv2d(ch * ch_mult[0], out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANOutput(NamedTuple):
    """What :meth:`VQGAN.forward` returns. ``recon`` and ``inputs`` are both in [-1, 1] space (the loss module's)."""

    recon: Tensor  # [B, out_ch, H, W], decoder output, not clamped
    inputs: Tensor  # [B, in_channels, H, W], images01 * 2 - 1
    codebook_loss: Tensor  # scalar: VQ codebook + commitment loss, or the Gumbel KL term
    indices: Tensor  # LongTensor [B, h*w], row-major


class VQGAN(GridSizes, nn.Module):
    """taming's VQModel (``quantizer="vq"``) or GumbelVQ (``"gumbel"``) without its training loss submodule.

    Submodules ``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``, ``quantize`` carry taming's exact key
    names, so a taming ``state_dict`` minus its ``loss.*`` keys loads with ``strict=True``.

    Works at any input size divisible by ``2 ** (len(ch_mult) - 1)``; attention placement comes from
    ``cfg.resolution``. ``image_size`` (the nominal side behind ``fmap_size``/``seq_len``) defaults to
    ``cfg.resolution`` and may be overridden (constructor argument or plain attribute).
    """

    def __init__(self, cfg: VQGANConfig, image_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.resolution if image_size is None else image_size
        common = {"ch": cfg.ch, "ch_mult": cfg.ch_mult, "num_res_blocks": cfg.num_res_blocks,
                  "attn_resolutions": cfg.attn_resolutions, "resolution": cfg.resolution, "z_channels": cfg.z_channels,
                  "dropout": cfg.dropout, "resamp_with_conv": cfg.resamp_with_conv}
        self.encoder = Encoder(in_channels=cfg.in_channels, double_z=cfg.double_z, **common)
        self.decoder = Decoder(out_ch=cfg.out_ch, **common)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        if cfg.quantizer == "vq":
            self.quantize: VectorQuantizer | GumbelQuantize = VectorQuantizer(
                cfg.n_embed, cfg.embed_dim, beta=cfg.beta, legacy=cfg.legacy_loss)
        else:
            self.quantize = GumbelQuantize(cfg.embed_dim, cfg.embed_dim, cfg.n_embed, cfg.straight_through,
                                           cfg.kl_weight, cfg.temperature)

    # -- sizes --------------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, meta: dict, state_dict: dict) -> VQGAN:
        """Rebuild a trained model from a checkpoint's ``meta`` (kind, config) and its weights, in eval mode; a bad
        config is a TypeError/ValueError, weights that do not fit it a RuntimeError."""
        model = cls(VQGANConfig(**meta["config"]))
        model.load_state_dict(state_dict, strict=True)
        if meta.get("image_size"):
            model.image_size = int(meta["image_size"])
        return model.eval()

    @property
    def num_tokens(self) -> int:
        return self.cfg.n_embed

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    # -- model space ([-1, 1]) ----------------------------------------------------------------------------------------
    def quantize_latents(self, x: Tensor, temperature: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, C, H, W] in [-1, 1] -> (z_q, codebook_loss, indices [B, h, w])."""
        return self.quantize(self.quant_conv(self.encoder(x)), temperature)

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Quantized latents [B, embed_dim, h, w] -> images in [-1, 1] space (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images01: Tensor, temperature: float | None = None) -> VQGANOutput:
        """Autoencode [0, 1] images for training; see :class:`VQGANOutput` (recon and inputs both in [-1, 1]).

        ``temperature`` only matters for the Gumbel quantizer in training mode (overrides ``quantize.temperature``).
        """
        check_images(images01, self.cfg.in_channels, self.downsample_factor)
        inputs = images01 * 2.0 - 1.0
        z_q, codebook_loss, indices = self.quantize_latents(inputs, temperature)
        return VQGANOutput(self.decode_latents(z_q), inputs, codebook_loss, indices.flatten(1))

    def last_layer(self) -> nn.Parameter:
        """The decoder's last conv weight (the adaptive GAN weight is computed from gradients w.r.t. it)."""
        return self.decoder.conv_out.weight

    # -- ImageTokenizer -----------------------------------------------------------------------------------------------
    @inference
    def encode(self, images: Tensor) -> Tensor:
        """[B, C, H, W] in [0, 1] -> LongTensor [B, (H/f)*(W/f)], row-major."""
        check_images(images, self.cfg.in_channels, self.downsample_factor)
        _, _, indices = self.quantize_latents(images * 2.0 - 1.0)
        return indices.flatten(1)

    @inference
    def decode(self, indices: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """LongTensor [B, h*w] (square grid unless ``grid=(h, w)``) -> images [B, out_ch, h*f, w*f] in [0, 1]."""
        h, w = token_grid(indices, self.num_tokens, grid)
        z_q = self.quantize.lookup(indices.long().view(-1, h, w))
        return ((self.decode_latents(z_q) + 1.0) / 2.0).clamp(0.0, 1.0)
