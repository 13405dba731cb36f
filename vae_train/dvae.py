"""The DALL-E style discrete VAE, with DALLE-pytorch's ``DiscreteVAE`` layout (its state dicts load without renaming:
``codebook.weight``, ``encoder.{i}.0.*`` ...). It works in mean/std-normalised space internally."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_train.protocol import GridSizes, check_images, inference, token_grid


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


class DiscreteVAE(GridSizes, nn.Module):
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
    @classmethod
    def from_checkpoint(cls, meta: dict, state_dict: dict) -> DiscreteVAE:
        """Rebuild a trained model from a checkpoint's ``meta`` (kind, config) and its weights, in eval mode; a bad
        config is a TypeError/ValueError, weights that do not fit it a RuntimeError."""
        model = cls(DVAEConfig(**meta["config"]))
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

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
        check_images(images01, self.cfg.channels, self.downsample_factor)
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
        check_images(images01, self.cfg.channels, self.downsample_factor)
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
            check_images(images, self.cfg.channels, self.downsample_factor)
            return self._nearest(self.encoder(self.normalize(images))).flatten(1)
        return self.logits(images).argmax(dim=1).flatten(1)

    @inference
    def decode(self, indices: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """LongTensor [B, h*w] (square grid unless ``grid=(h, w)``) -> images [B, C, h*f, w*f] in [0, 1]."""
        h, w = token_grid(indices, self.num_tokens, grid)
        codes = self.codebook(indices.long()).view(indices.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.denormalize(self.decoder(codes)).clamp(0.0, 1.0)
