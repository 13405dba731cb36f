"""VQGAN training loss: L1 + LPIPS reconstruction, PatchGAN discriminator with an adaptive weight, codebook term.

A re-implementation of taming-transformers' ``VQLPIPSWithDiscriminator`` whose submodule names follow taming's, so
the ``loss.discriminator.*`` and ``loss.perceptual_loss.*`` entries of a public taming checkpoint load 1:1 once the
``loss.`` prefix is stripped (see :meth:`VQGANLoss.load_taming_loss_state`).

Conventions: images are ``[B, 3, H, W]`` in ``[-1, 1]``. LPIPS weights are read ONLY from local files; without them
the perceptual term is switched off (a randomly initialised VGG is not a perceptual loss).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

PathLike = str | Path

# VGG16 ``features`` indices [start, end) of taming's five LPIPS slices (ending at relu1_2 ... relu5_3).
VGG_SLICES: tuple[tuple[int, int], ...] = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
VGG_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # convs among features[0:30]
# LPIPS input normalisation (taming / PerceptualSimilarity ScalingLayer), for inputs in [-1, 1].
LPIPS_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)
# Prefixes under which a taming checkpoint stores the LPIPS module, most specific first.
PERCEPTUAL_PREFIXES: tuple[str, ...] = ("loss.perceptual_loss.", "perceptual_loss.")


# --------------------------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """Per-channel affine normalisation ``scale * (x + loc)`` initialised from the first training batch.

    Key names (``loc``, ``scale``, ``initialized``) follow taming's ActNorm so its checkpoints load.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.copy_(1.0 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


def init_discriminator_weights(module: nn.Module) -> None:
    """taming's ``weights_init``: conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0.

    Conv biases and ActNorm keep their defaults. Use as ``discriminator.apply(init_discriminator_weights)``.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN discriminator laid out exactly like taming's (one ``nn.Sequential`` named ``main``).

    ``main`` holds: conv(4, s2) + LeakyReLU; ``n_layers - 1`` blocks of conv(4, s2) + norm + LeakyReLU with
    channels ``ndf * min(2**n, 8)``; one conv(4, s1) + norm + LeakyReLU; a final conv(4, s1) to 1 channel. Convs
    followed by BatchNorm have no bias (with ActNorm they do). For n_layers=3 a 256x256 input gives 30x30 logits.

    Args:
        input_nc: channels of the input images.
        ndf: filters of the first conv.
        n_layers: number of stride-2 convs.
        use_actnorm: ActNorm instead of BatchNorm2d.
        init_weights: apply :func:`init_discriminator_weights` (taming always does).
    """

    def __init__(
        self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False, init_weights: bool = True
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        norm: type[nn.Module] = ActNorm if use_actnorm else nn.BatchNorm2d
        bias = use_actnorm  # BatchNorm has its own affine shift
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        if init_weights:
            self.apply(init_discriminator_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits ``[B, 1, h, w]``."""
        return self.main(x)


# --------------------------------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------------------------------


class ScalingLayer(nn.Module):
    """Maps ``[-1, 1]`` inputs to the statistics VGG expects: ``(x - shift) / scale`` (buffers, as in taming)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    """torchvision VGG16 ``features`` cut into five ``slice{k}`` Sequentials that keep the original indices as names.

    Args:
        random_init: initialise the weights as torchvision does. False (what LPIPS uses, since it overwrites every
            weight from a file) builds on the meta device and leaves the CPU memory uninitialised: much faster, and
            the 500 MB classifier is never allocated.
    """

    def __init__(self, random_init: bool = True) -> None:
        from torchvision.models import vgg16  # here: importing torchvision costs seconds of every command's start-up

        super().__init__()
        if random_init:
            features = vgg16(weights=None).features
        else:
            with torch.device("meta"):
                features = vgg16(weights=None).features
            features = features.to_empty(device="cpu")
        for k, (start, end) in enumerate(VGG_SLICES, start=1):
            part = nn.Sequential()
            for i in range(start, end):
                part.add_module(str(i), features[i])
            self.add_module(f"slice{k}", part)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3."""
        outs = []
        for k in range(1, len(VGG_SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """Dropout + 1x1 conv without bias (key ``model.1.weight``), one per VGG stage."""

    def __init__(self, in_channels: int, dropout: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if dropout else []
        layers.append(nn.Conv2d(in_channels, 1, 1, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _unit_normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _load_tensors(path: PathLike) -> dict[str, Tensor]:
    """Tensors of a local state-dict file (``weights_only``); a Lightning ``{"state_dict": ...}`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path} does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _slice_of(index: int) -> int | None:
    """1-based LPIPS slice holding VGG ``features[index]``; None past relu5_3."""
    return next((k for k, (start, end) in enumerate(VGG_SLICES, start=1) if start <= index < end), None)


def _lpips_entries(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Translate one source state dict to LPIPS module keys.

    Accepts a taming state dict (``loss.perceptual_loss.*`` or ``perceptual_loss.*``), a bare LPIPS state dict
    (``lin0.model.1.weight`` ..., ``net.slice1.0.weight`` ...) and a torchvision VGG16 state dict (``features.N.*``).
    Keys that are none of these are dropped.
    """
    for prefix in PERCEPTUAL_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
            index = int(parts[1])
            slice_no = _slice_of(index)
            if slice_no is not None:
                out[f"net.slice{slice_no}.{index}.{parts[2]}"] = value
        elif parts[0] in ("net", "scaling_layer") or (parts[0].startswith("lin") and parts[0][3:].isdigit()):
            out[key] = value
    return out


def _required_lpips_keys() -> set[str]:
    """Keys that must come from files: every VGG conv weight/bias of the slices and every lin weight."""
    keys = {f"lin{k}.model.1.weight" for k in range(len(VGG_CHANNELS))}
    for index in VGG_CONV_INDICES:
        slice_no = _slice_of(index)
        keys |= {f"net.slice{slice_no}.{index}.weight", f"net.slice{slice_no}.{index}.bias"}
    return keys


def _collect_lpips_state(paths: Iterable[PathLike | None]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in paths:
        if path is not None:
            state.update(_lpips_entries(_load_tensors(path)))
    return state


def lpips_available(vgg_path: PathLike | None, lin_path: PathLike | None) -> bool:
    """True when the given local files together hold every VGG16 conv and every LPIPS lin weight.

    Either file may be a taming state dict / checkpoint with ``loss.perceptual_loss.*`` keys, which alone suffices.
    Missing or unreadable files give False; nothing is downloaded.
    """
    try:
        state = _collect_lpips_state((vgg_path, lin_path))
    except (OSError, ValueError, TypeError, RuntimeError):
        return False
    return _required_lpips_keys() <= state.keys()


class LPIPS(nn.Module):
    """Learned perceptual distance (VGG16 variant) with taming's module layout; frozen, always in eval mode.

    ``forward(x, y)`` returns the per-image distance ``[B]``: unit-normalise the five VGG stage activations over
    channels, squared difference, 1x1 ``lin{k}`` conv, spatial mean, sum over stages. Inputs in ``[-1, 1]``.

    Args:
        vgg_path: local torchvision VGG16 state dict (e.g. ``vgg16-397923af.pth``) or a taming state dict.
        lin_path: local LPIPS ``vgg.pth`` holding ``lin{k}.model.1.weight`` or a taming state dict.
        dropout: keep taming's Dropout in front of each lin conv (only changes key names; never active).

    Raises ValueError when the files do not provide all weights; LPIPS never runs with random weights.
    """

    def __init__(self, vgg_path: PathLike | None = None, lin_path: PathLike | None = None, dropout: bool = True) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices(random_init=False)  # every weight is loaded below
        for k, channels in enumerate(VGG_CHANNELS):
            self.add_module(f"lin{k}", NetLinLayer(channels, dropout=dropout))
        state = _collect_lpips_state((vgg_path, lin_path))
        if not dropout:
            state = {k.replace(".model.1.", ".model.0."): v for k, v in state.items()}
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state and not k.startswith("scaling_layer."))
        if missing:
            raise ValueError(
                f"LPIPS weights incomplete (vgg_path={vgg_path}, lin_path={lin_path}): {len(missing)} keys missing, "
                f"e.g. {missing[:3]}"
            )
        self.load_state_dict({k: state.get(k, v) for k, v in own.items()}, strict=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever the parent does (taming's LPIPS ends up with active dropout there)."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        feats_x = self.net(self.scaling_layer(x))
        feats_y = self.net(self.scaling_layer(y))
        total = x.new_zeros(x.shape[0])
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)).pow(2)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return total


# --------------------------------------------------------------------------------------------------------------------
# GAN losses and the combined VQGAN loss
# --------------------------------------------------------------------------------------------------------------------


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` (0) before ``threshold`` steps, ``weight`` from then on."""
    return value if step < threshold else weight


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating BCE: ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


class VQGANLoss(nn.Module):
    """taming's VQLPIPSWithDiscriminator: ``generator_loss`` for the autoencoder step, ``discriminator_loss`` for D.

    Generator: ``nll = pixel_weight * mean|x - x̂| + perceptual_weight * mean(LPIPS(x, x̂))``;
    ``loss = nll + d_weight * disc_factor(step) * g + codebook_weight * mean(codebook_loss)`` with
    ``g = -mean(D(x̂))`` and ``d_weight = clamp(|∇_last nll| / (|∇_last g| + 1e-4), 0, 1e4).detach() * disc_weight``.
    Discriminator: ``disc_factor(step) * hinge_or_vanilla(D(x), D(x̂))``. ``disc_factor(step)`` is 0 before
    ``disc_start``; then the generator step skips D entirely (g = d_weight = 0).

    Args:
        disc_start: global step from which the GAN terms count.
        codebook_weight: weight of the quantizer (codebook + commitment) loss.
        pixel_weight: weight of the L1 term (taming stores but ignores it; at the default 1.0 both agree).
        perceptual_weight: weight of LPIPS; forced to 0 (with a warning) when no LPIPS files are given.
        disc_num_layers, disc_in_channels, disc_ndf, disc_use_actnorm: discriminator shape.
        disc_factor: GAN factor once ``step >= disc_start``.
        disc_weight: multiplier on the adaptive weight.
        disc_loss: ``"hinge"`` or ``"vanilla"``.
        gan: False builds no discriminator: pure reconstruction + codebook training.
        lpips_vgg_path, lpips_lin_path: local LPIPS weight files, see :class:`LPIPS`.
    """

    def __init__(
        self,
        disc_start: int = 0,
        codebook_weight: float = 1.0,
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        gan: bool = True,
        lpips_vgg_path: PathLike | None = None,
        lpips_lin_path: PathLike | None = None,
        disc_use_actnorm: bool = False,
    ) -> None:
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        self.disc_start = disc_start
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixel_weight
        self.disc_factor = disc_factor
        self.disc_weight = disc_weight
        self.disc_loss_name = disc_loss
        self.gan = gan

        self.perceptual_loss: LPIPS | None = None
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0:
            if lpips_vgg_path is None and lpips_lin_path is None:
                log.warning(
                    "VQGANLoss: no LPIPS weight files given (lpips_vgg_path / lpips_lin_path); the perceptual term is "
                    "OFF (perceptual_weight %s -> 0)",
                    perceptual_weight,
                )
                self.perceptual_weight = 0.0
            else:
                self.perceptual_loss = LPIPS(lpips_vgg_path, lpips_lin_path)

        self.discriminator: NLayerDiscriminator | None = None
        if gan:
            self.discriminator = NLayerDiscriminator(
                input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=disc_use_actnorm
            )

    @property
    def perceptual_enabled(self) -> bool:
        return self.perceptual_loss is not None

    def disc_factor_at(self, step: int) -> float:
        """GAN factor at ``step``: 0 without GAN or before ``disc_start``."""
        if not self.gan:
            return 0.0
        return adopt_weight(self.disc_factor, step, threshold=self.disc_start)

    def adaptive_weight(self, nll: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
        """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer (detached)."""
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach()
        return weight * self.disc_weight

    def generator_loss(
        self, inputs: Tensor, recon: Tensor, codebook_loss: Tensor, step: int, last_layer: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Autoencoder loss. ``last_layer`` (the decoder's final conv weight) is needed while training with the GAN."""
        rec = (inputs - recon).abs().mean()
        nll = self.pixel_weight * rec
        p_loss = rec.new_zeros(())
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs, recon).mean()
            nll = nll + self.perceptual_weight * p_loss
        codebook = codebook_loss.mean()

        disc_factor = self.disc_factor_at(step)
        g_loss = rec.new_zeros(())
        d_weight = rec.new_zeros(())
        loss = nll + self.codebook_weight * codebook
        if disc_factor > 0:
            assert self.discriminator is not None
            g_loss = -self.discriminator(recon).mean()
            if self.training and torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError("generator_loss needs last_layer (decoder's last weight) for the adaptive weight")
                d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * disc_factor * g_loss

        logs = {
            "total": loss.item(),
            "nll": nll.item(),
            "rec": rec.item(),
            "p": p_loss.item(),
            "g": g_loss.item(),
            "d_weight": d_weight.item(),
            "disc_factor": float(disc_factor),
            "codebook": codebook.item(),
        }
        return loss, logs

    def discriminator_loss(self, inputs: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """Discriminator loss on real ``inputs`` and (detached here) ``recon``; scaled by ``disc_factor_at(step)``."""
        if self.discriminator is None:
            raise RuntimeError("VQGANLoss was built with gan=False: there is no discriminator to train")
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(recon.detach())
        disc_factor = self.disc_factor_at(step)
        loss = disc_factor * D_LOSSES[self.disc_loss_name](logits_real, logits_fake)
        logs = {
            "disc_loss": loss.item(),
            "logits_real": logits_real.detach().mean().item(),
            "logits_fake": logits_fake.detach().mean().item(),
            "disc_factor": float(disc_factor),
        }
        return loss, logs

    def load_taming_loss_state(self, state: Mapping[str, Tensor]) -> list[str]:
        """Load the ``loss.*`` entries of a taming state dict (or Lightning checkpoint dict) into this module.

        ``loss.discriminator.*`` must match the discriminator strictly (all keys, same shapes) when present and this
        loss has a GAN; ``loss.perceptual_loss.*`` likewise for LPIPS when it is enabled. Entries for a disabled
        part are skipped (logged). Returns the ``loss.*`` keys that were loaded.
        """
        if isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        loaded: list[str] = []
        parts: list[tuple[str, nn.Module | None]] = [
            ("discriminator", self.discriminator),
            ("perceptual_loss", self.perceptual_loss),
        ]
        for name, module in parts:
            prefix = f"loss.{name}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                continue
            if module is None:
                log.info("load_taming_loss_state: %d %s* entries skipped (%s is disabled)", len(sub), prefix, name)
                continue
            module.load_state_dict(sub, strict=True)
            loaded += [prefix + k for k in sub]
        return loaded
