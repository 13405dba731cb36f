"""taming-transformers' PatchGAN discriminator (``NLayerDiscriminator``, with optional ActNorm), its key names kept."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
