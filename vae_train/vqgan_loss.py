"""VQGAN training loss: L1 + LPIPS reconstruction, PatchGAN discriminator with an adaptive weight, codebook term.

A re-implementation of taming-transformers' ``VQLPIPSWithDiscriminator`` whose submodule names follow taming's, so
the ``loss.discriminator.*`` and ``loss.perceptual_loss.*`` entries of a public taming checkpoint load 1:1 once the
``loss.`` prefix is stripped (see :meth:`VQGANLoss.load_taming_loss_state`).

Conventions: images are ``[B, 3, H, W]`` in ``[-1, 1]``. LPIPS weights are read ONLY from local files; without them
the perceptual term is switched off (a randomly initialised VGG is not a perceptual loss).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_train.discriminator import NLayerDiscriminator
from vae_train.lpips import LPIPS, PathLike

log = logging.getLogger(__name__)


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
