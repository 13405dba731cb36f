"""Image tokenizers: the DALL-E style dVAE (DALLE-pytorch layout) and the taming-transformers VQGAN.

Both turn images into a grid of codebook indices and back, behind one small protocol, :class:`ImageTokenizer`:

    encode(images01 [B, C, H, W] in [0, 1]) -> LongTensor [B, h*w]   (row-major over the token grid)
    decode(indices [B, h*w])                -> images [B, C, H, W] in [0, 1] (clamped)

Each model normalises internally; nothing outside this file needs to know that the dVAE works in mean/std-normalised
space or that the VQGAN works in [-1, 1]. Submodule names follow the original projects exactly, so their state_dicts
load without renaming: ``DiscreteVAE`` matches DALLE-pytorch's ``DiscreteVAE`` (``codebook.weight``, ``encoder.{i}.0.*``
...), ``VQGAN`` matches taming's ``VQModel`` / ``GumbelVQ`` minus its ``loss.*`` submodule.

No file I/O here; reading foreign checkpoints lives in ``vae_train/convert.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------------------
# the protocol and shared helpers


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


def _check_images(images: Tensor, channels: int, factor: int) -> None:
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"expected images of shape [B, {channels}, H, W], got {tuple(images.shape)}")
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"image height and width must be divisible by {factor}, got {tuple(images.shape[2:])}")


def _token_grid(indices: Tensor, num_tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
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



class _GridSizes:
    """Token-grid sizes shared by the grid tokenizers (they define ``image_size`` and ``downsample_factor``)."""

    image_size: int
    downsample_factor: int

    @property
    def fmap_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def seq_len(self) -> int:
        return self.fmap_size**2


# ---------------------------------------------------------------------------------------------------------------------
# dVAE (DALLE-pytorch DiscreteVAE)


@dataclass
class DVAEConfig:
    """DALLE-pytorch ``DiscreteVAE`` options, same names and defaults (``normalization`` split into three fields)."""

    image_size: int = 256  # nominal side; a power of two
    num_tokens: int = 512  # codebook size
    codebook_dim: int = 512  # width of each codebook vector
    num_layers: int = 3  # stride-2 downsamples; token grid side = image_size / 2**num_layers
    num_resnet_blocks: int = 0  # residual blocks after the encoder convs / before the decoder convs
    hidden_dim: int = 64  # channel width of every conv
    channels: int = 3  # 3 = RGB, 4 = RGBA (alpha is not normalised)
    smooth_l1_loss: bool = False  # reconstruction loss: smooth-L1 instead of MSE
    temperature: float = 0.9  # Gumbel-softmax tau (forward(temperature=...) overrides it)
    straight_through: bool = False  # hard (one-hot) Gumbel-softmax forward, soft gradient
    kl_div_loss_weight: float = 0.0  # weight of KL(q(z|x) || uniform), see DiscreteVAE.forward
    quantizer: str = "gumbel"  # gumbel (DALL-E / DALLE-pytorch) | vq (nearest code, straight-through, commitment)
    beta: float = 0.25  # vq: commitment weight
    restart_dead_codes: bool = True  # vq: codes unused for ~100 steps are moved onto random encoder outputs
    activation: str = "relu"  # relu (DALLE-pytorch) | leaky_relu (0.1): an encoder of dead ReLUs cannot collapse
    normalize: bool = True  # apply (x - mean) / std to the first len(norm_mean) channels inside the model
    norm_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    norm_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        self.norm_mean, self.norm_std = tuple(self.norm_mean), tuple(self.norm_std)  # lists after a JSON round trip
        if self.image_size <= 0 or self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size must be a power of two, got {self.image_size}")
        if self.num_layers < 1 or self.image_size < 2**self.num_layers:
            raise ValueError(f"num_layers must be >= 1 and leave a token grid of at least 1x1, got {self.num_layers}")
        if len(self.norm_mean) != len(self.norm_std) or len(self.norm_mean) > self.channels:
            raise ValueError("norm_mean and norm_std must have the same length, at most `channels`")
        if self.quantizer not in ("gumbel", "vq"):
            raise ValueError(f"quantizer must be gumbel or vq, got {self.quantizer!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    raise ValueError(f"activation must be relu or leaky_relu, got {name!r}")


class DVAEResBlock(nn.Module):
    """3x3 conv - act - 3x3 conv - act - 1x1 conv, plus the input (keys ``net.{0,2,4}``)."""

    def __init__(self, dim: int, activation: str = "relu"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), _activation(activation),
            nn.Conv2d(dim, dim, 3, padding=1), _activation(activation),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + x


class DiscreteVAE(_GridSizes, nn.Module):
    """The DALL-E dVAE as DALLE-pytorch builds it: conv encoder to per-cell logits, Gumbel-softmax over a codebook,
    transposed-conv decoder.

    State-dict layout (identical to DALLE-pytorch, so its ``vae.pt`` ``weights`` load strictly), with L = num_layers and
    R = num_resnet_blocks:

    - ``codebook.weight`` [num_tokens, codebook_dim]
    - ``encoder.{0..L-1}.0.*`` 4x4 stride-2 convs, ``encoder.{L..L+R-1}.net.{0,2,4}.*`` res blocks,
      ``encoder.{L+R}.*`` 1x1 conv to ``num_tokens`` logits
    - decoder: with R > 0, ``decoder.0`` is a 1x1 conv codebook_dim -> hidden_dim followed by the R res blocks; then
      ``decoder.{j}.0.*`` 4x4 stride-2 transposed convs and a last 1x1 conv to ``channels``.

    Unlike DALLE-pytorch, :meth:`decode` returns images in [0, 1] (it undoes the normalisation and clamps).
    """

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.num_tokens = cfg.num_tokens
        self.temperature = cfg.temperature
        hidden, has_res = cfg.hidden_dim, cfg.num_resnet_blocks > 0

        self.codebook = nn.Embedding(cfg.num_tokens, cfg.codebook_dim)

        enc: list[nn.Module] = []
        dim_in = cfg.channels
        for _ in range(cfg.num_layers):
            enc.append(nn.Sequential(nn.Conv2d(dim_in, hidden, 4, stride=2, padding=1), _activation(cfg.activation)))
            dim_in = hidden
        enc += [DVAEResBlock(hidden, cfg.activation) for _ in range(cfg.num_resnet_blocks)]
        enc.append(nn.Conv2d(hidden, cfg.num_tokens if cfg.quantizer == "gumbel" else cfg.codebook_dim, 1))
        self.encoder = nn.Sequential(*enc)
        if cfg.quantizer == "vq":  # EMA of each code's share of the assignments (persistent: resumes exactly)
            self.register_buffer("code_usage", torch.zeros(cfg.num_tokens))

        dec: list[nn.Module] = []
        if has_res:
            dec.append(nn.Conv2d(cfg.codebook_dim, hidden, 1))
            dec += [DVAEResBlock(hidden, cfg.activation) for _ in range(cfg.num_resnet_blocks)]
        dim_in = hidden if has_res else cfg.codebook_dim
        for _ in range(cfg.num_layers):
            dec.append(nn.Sequential(nn.ConvTranspose2d(dim_in, hidden, 4, stride=2, padding=1),
                                     _activation(cfg.activation)))
            dim_in = hidden
        dec.append(nn.Conv2d(hidden, cfg.channels, 1))
        self.decoder = nn.Sequential(*dec)

        # not persistent: DALLE-pytorch keeps the normalisation outside its state_dict
        self.register_buffer("norm_mean", torch.tensor(cfg.norm_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(cfg.norm_std).view(1, -1, 1, 1), persistent=False)

    # -- sizes --------------------------------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return 2**self.cfg.num_layers

    # -- pixel space <-> model space ----------------------------------------------------------------------------------
    def normalize(self, images01: Tensor) -> Tensor:
        """[0, 1] pixels -> the model's input space (mean/std on the first len(norm_mean) channels)."""
        if not self.cfg.normalize:
            return images01
        n = self.norm_mean.shape[1]
        head = (images01[:, :n] - self.norm_mean) / self.norm_std
        return torch.cat([head, images01[:, n:]], dim=1) if images01.shape[1] > n else head

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize` (no clamping)."""
        if not self.cfg.normalize:
            return x
        n = self.norm_mean.shape[1]
        head = x[:, :n] * self.norm_std + self.norm_mean
        return torch.cat([head, x[:, n:]], dim=1) if x.shape[1] > n else head

    # -- training -----------------------------------------------------------------------------------------------------
    def logits(self, images01: Tensor) -> Tensor:
        """Per-cell codebook logits [B, num_tokens, h, w]."""
        _check_images(images01, self.cfg.channels, self.downsample_factor)
        return self.encoder(self.normalize(images01))

    def forward(self, images01: Tensor, temperature: float | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Training step quantities: ``(loss, {"recon": ..., "kl": ...}, recon01)``.

        - ``loss = recon + kl_div_loss_weight * kl``; ``recon`` is the MSE (or smooth-L1) between the normalised input
          and the decoder output, in the normalised space, as in DALLE-pytorch.
        - ``kl`` is KL(softmax(logits) || uniform) averaged over images and token positions. DALLE-pytorch's value is
          the plain sum over batch, positions and codes (its ``batchmean`` divides by 1), i.e. ours times
          ``B * h * w``; scale ``kl_div_loss_weight`` accordingly when porting its hyper-parameters.
        - ``recon01`` is the reconstruction mapped back to pixel space (not clamped, still attached to the graph).
        - The metrics are detached.

        ``temperature`` overrides ``self.temperature`` (which a trainer may anneal) for this call.
        """
        if self.cfg.quantizer == "vq":
            return self._forward_vq(images01)
        logits = self.logits(images01)
        tau = self.temperature if temperature is None else temperature
        one_hot = F.gumbel_softmax(logits, tau=tau, dim=1, hard=self.cfg.straight_through)
        sampled = torch.einsum("bnhw,nd->bdhw", one_hot, self.codebook.weight)
        out = self.decoder(sampled)

        target = self.normalize(images01)
        recon = F.smooth_l1_loss(out, target) if self.cfg.smooth_l1_loss else F.mse_loss(out, target)
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.num_tokens))).sum(dim=1).mean()
        loss = recon + self.cfg.kl_div_loss_weight * kl
        return loss, {"recon": recon.detach(), "kl": kl.detach()}, self.denormalize(out)

    def _nearest(self, z: Tensor) -> Tensor:
        """Index of the nearest code (squared L2) for every cell of z [B, D, h, w] -> [B, h, w]."""
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32 even under bf16 autocast
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
            e = self.codebook.weight.float()
            d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def _forward_vq(self, images01: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """VQ-VAE step: nearest code, straight-through gradient, codebook + beta * commitment loss."""
        _check_images(images01, self.cfg.channels, self.downsample_factor)
        z = self.encoder(self.normalize(images01))
        idx = self._nearest(z.detach())
        zq = self.codebook(idx).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(zq, z.detach())
        commit = F.mse_loss(z, zq.detach())
        out = self.decoder(z + (zq - z).detach())
        target = self.normalize(images01)
        recon = F.smooth_l1_loss(out, target) if self.cfg.smooth_l1_loss else F.mse_loss(out, target)
        loss = recon + codebook_loss + self.cfg.beta * commit
        if self.training and self.cfg.restart_dead_codes:
            self._restart_dead_codes(idx, z.detach())
        return loss, {"recon": recon.detach(), "commit": commit.detach()}, self.denormalize(out)

    @torch.no_grad()
    def _restart_dead_codes(self, idx: Tensor, z: Tensor, decay: float = 0.99) -> None:
        """Codes whose usage EMA fell under 3% of uniform are moved onto random encoder outputs of this batch (on
        several processes, rank 0's choice is broadcast so every replica keeps the same codebook)."""
        n = self.num_tokens
        share = torch.bincount(idx.flatten(), minlength=n).float() / idx.numel()
        self.code_usage.mul_(decay).add_(share, alpha=1 - decay)
        dead = self.code_usage < 0.03 / n
        if bool(dead.any()):
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)
            self.codebook.weight.data[dead] = flat[pick].to(self.codebook.weight.dtype)
            self.code_usage[dead] = 1.0 / n
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook.weight.data, src=0)
            torch.distributed.broadcast(self.code_usage, src=0)

    def loss(self, images01: Tensor, temperature: float | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Same as calling the module (see :meth:`forward`); a readable name for training loops."""
        return self(images01, temperature)

    # -- ImageTokenizer -----------------------------------------------------------------------------------------------
    @inference
    def encode(self, images: Tensor) -> Tensor:
        """[B, C, H, W] in [0, 1] -> LongTensor [B, (H/f)*(W/f)], row-major: argmax of the logits (gumbel) or the
        nearest code (vq)."""
        if self.cfg.quantizer == "vq":
            _check_images(images, self.cfg.channels, self.downsample_factor)
            return self._nearest(self.encoder(self.normalize(images))).flatten(1)
        return self.logits(images).argmax(dim=1).flatten(1)

    @inference
    def decode(self, indices: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """LongTensor [B, h*w] (square grid unless ``grid=(h, w)``) -> images [B, C, h*f, w*f] in [0, 1]."""
        h, w = _token_grid(indices, self.num_tokens, grid)
        codes = self.codebook(indices.long()).view(indices.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.denormalize(self.decoder(codes)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# VQGAN (taming-transformers VQModel / GumbelVQ)


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


class VQGANOutput(NamedTuple):
    """What :meth:`VQGAN.forward` returns. ``recon`` and ``inputs`` are both in [-1, 1] space (the loss module's)."""

    recon: Tensor  # [B, out_ch, H, W], decoder output, not clamped
    inputs: Tensor  # [B, in_channels, H, W], images01 * 2 - 1
    codebook_loss: Tensor  # scalar: VQ codebook + commitment loss, or the Gumbel KL term
    indices: Tensor  # LongTensor [B, h*w], row-major


class VQGAN(_GridSizes, nn.Module):
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
        _check_images(images01, self.cfg.in_channels, self.downsample_factor)
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
        _check_images(images, self.cfg.in_channels, self.downsample_factor)
        _, _, indices = self.quantize_latents(images * 2.0 - 1.0)
        return indices.flatten(1)

    @inference
    def decode(self, indices: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """LongTensor [B, h*w] (square grid unless ``grid=(h, w)``) -> images [B, out_ch, h*f, w*f] in [0, 1]."""
        h, w = _token_grid(indices, self.num_tokens, grid)
        z_q = self.quantize.lookup(indices.long().view(-1, h, w))
        return ((self.decode_latents(z_q) + 1.0) / 2.0).clamp(0.0, 1.0)
