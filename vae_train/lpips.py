"""LPIPS (VGG16 features + learned linear heads), as taming-transformers / PerceptualSimilarity compute it, its key
names kept so the ``loss.perceptual_loss.*`` entries of a taming checkpoint load. Weights are read ONLY from local
files; without them there is no perceptual loss (a randomly initialised VGG is not one)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

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

    def __init__(self, vgg_path: PathLike | None = None, lin_path: PathLike | None = None,
                 dropout: bool = True) -> None:
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
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y, strict=True)):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)).pow(2)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return total
