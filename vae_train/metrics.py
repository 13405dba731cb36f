"""Reconstruction metrics for VQ autoencoders: PSNR, SSIM, codebook usage, and a batch-by-batch accumulator.

Conventions: images are ``[B, C, H, W]`` floats in ``[0, 1]`` (use :func:`to_unit_range` on ``[-1, 1]`` model
outputs); PSNR and SSIM are per image (``Tensor[B]``) and averaged over images by :class:`RunningStats`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def to_unit_range(x: Tensor) -> Tensor:
    """Map ``[-1, 1]`` images to ``[0, 1]`` (clamped)."""
    return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).float()


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, ``10 * log10(data_range**2 / mse)`` with the MSE over C, H, W; ``inf`` when identical."""
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).to(torch.promote_types(x.dtype, torch.float32))


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalised 1-D Gaussian of ``size`` taps centred on the middle one."""
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _blur(x: Tensor, window: Tensor) -> Tensor:
    """Separable depthwise Gaussian filter, 'valid' region only (no padding)."""
    channels = x.shape[1]
    kh = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    kw = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    return F.conv2d(F.conv2d(x, kh, groups=channels), kw, groups=channels)


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, averaged over the valid region and the channels.

    Local statistics use a ``win_size`` x ``win_size`` Gaussian (σ = ``sigma``) with NO padding: only windows that
    lie fully inside the image count. That is pytorch_msssim's convention and equals skimage's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)`` (which
    filters with reflection and then crops the border). Identical images give exactly 1. Needs H, W >= ``win_size``.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two [B, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than the SSIM window {win_size}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    window = gaussian_window(win_size, sigma, dtype).to(x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1)


def _usage_from_counts(counts: Tensor) -> dict[str, float | int]:
    num_tokens = counts.numel()
    total = counts.sum().item()
    used = int((counts > 0).sum().item())
    if total == 0:
        return {"perplexity": 0.0, "used_fraction": 0.0, "used": 0}
    p = counts[counts > 0].double() / total
    entropy = -(p * p.log()).sum().item()
    return {"perplexity": math.exp(entropy), "used_fraction": used / num_tokens, "used": used}


def code_histogram(indices: Tensor, num_tokens: int) -> Tensor:
    """Counts ``[num_tokens]`` (int64, CPU) of the code indices of any shape."""
    flat = indices.detach().flatten().long().cpu()
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_tokens):
        raise ValueError(f"code indices must lie in [0, {num_tokens}), got [{flat.min()}, {flat.max()}]")
    return torch.bincount(flat, minlength=num_tokens)


def codebook_usage(indices: Tensor, num_tokens: int) -> dict[str, float | int]:
    """Codebook usage of a batch of code indices.

    ``perplexity`` = exp(entropy in nats of the code histogram): the number of equally used codes it is worth
    (``num_tokens`` at best; 0.0 for no indices); ``used`` = distinct codes seen; ``used_fraction`` = used / num_tokens.
    """
    return _usage_from_counts(code_histogram(indices, num_tokens))


class RunningStats:
    """Accumulates reconstruction metrics over a validation loader, batch by batch.

    ``update(x, y, indices)`` adds per-image PSNR and SSIM of ``x`` vs ``y`` (``[0, 1]`` images) and the code
    histogram of ``indices``; ``add(name, values)`` adds any other per-item values (e.g. LPIPS). ``result()``
    returns means over all items (and the usage of the summed histogram), never an average of batch averages.

    Args:
        num_tokens: codebook size; needed only when ``indices`` are passed.
        data_range: value range of the images.
        psnr_cap: per-image PSNR is capped here (dB) so identical images do not make the mean infinite.
        with_ssim: compute SSIM in ``update`` (skipped automatically for images smaller than the window).
    """

    def __init__(
        self, num_tokens: int | None = None, data_range: float = 1.0, psnr_cap: float = 100.0, with_ssim: bool = True
    ) -> None:
        self.num_tokens = num_tokens
        self.data_range = data_range
        self.psnr_cap = psnr_cap
        self.with_ssim = with_ssim
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.histogram: Tensor | None = None

    def add(self, name: str, values: Tensor | float) -> None:
        """Add per-item values (a tensor of any shape, or one number) to the running mean ``name``."""
        values = torch.as_tensor(values, dtype=torch.float64).detach().flatten()
        self.sums[name] = self.sums.get(name, 0.0) + values.sum().item()
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    @torch.no_grad()
    def update(self, x: Tensor | None = None, y: Tensor | None = None, indices: Tensor | None = None) -> None:
        """Add one batch: reconstructions ``x`` vs targets ``y`` and/or code ``indices``."""
        if (x is None) != (y is None):
            raise ValueError("pass both x and y, or neither")
        if x is not None and y is not None:
            self.add("psnr", psnr(x, y, self.data_range).clamp(max=self.psnr_cap))
            if self.with_ssim and min(x.shape[-2:]) >= 11:
                self.add("ssim", ssim(x, y, self.data_range))
        if indices is not None:
            if self.num_tokens is None:
                raise ValueError("RunningStats(num_tokens=...) is needed to count code usage")
            counts = code_histogram(indices, self.num_tokens)
            self.histogram = counts if self.histogram is None else self.histogram + counts

    def result(self) -> dict[str, float | int]:
        """Means of every accumulated quantity, ``n_<name>`` item counts, and codebook usage when indices came in."""
        out: dict[str, float | int] = {}
        for name, total in self.sums.items():
            out[name] = total / self.counts[name] if self.counts[name] else float("nan")
            out[f"n_{name}"] = self.counts[name]
        if self.histogram is not None:
            out.update(_usage_from_counts(self.histogram))
        return out
