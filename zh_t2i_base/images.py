"""Images in [0, 1] (float, ``[B, 3, H, W]``, how they cross package boundaries) -> 8-bit pixels and PNG files.

One rounding everywhere: ``round(255 x)`` after clamping to [0, 1], the pixels torchvision's ``save_image`` writes
(done here without importing torchvision: seconds of start-up)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from zh_t2i_base.fileio import atomic_path


def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """``[..., C, H, W]`` floats in [0, 1] -> ``[..., H, W, C]`` uint8 on the CPU."""
    x = images01.detach().float().clamp(0, 1).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).cpu()


def to_pil(images01: torch.Tensor) -> list:
    """``[B, 3, H, W]`` in [0, 1] -> a list of RGB ``PIL.Image``."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images01).numpy()]


def save_png(image, path: str | os.PathLike) -> Path:
    """A ``PIL.Image`` -> ``path`` as PNG, atomically (a kill leaves no half-written file)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="png")
    return Path(path)


def save_image_grid(images01: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Images in [0,1], [B,3,H,W] -> one PNG grid (atomically): ``nrow`` images a row, 2 black pixels around each,
    as torchvision's ``save_image`` lays it out."""
    from PIL import Image

    x = images01.detach().float().clamp(0, 1).cpu()
    b, c, h, w = x.shape
    cols = min(nrow, b)
    rows, pad = -(-b // cols), 2
    grid = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(b):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    arr = to_uint8(grid).numpy()
    return save_png(Image.fromarray(arr[:, :, 0] if c == 1 else arr), path)


def numbered_images(directory: str | os.PathLike, extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg")
                    ) -> dict[int, Path]:
    """``{i: DIR/{i}.ext}`` of the numbered images in ``directory`` (``dalle_gen.py``'s ``{i}.png|jpg``), from one
    listing whatever their number; where ``i`` has several, the extension listed first wins."""
    found: dict[int, Path] = {}
    with os.scandir(directory) as it:
        for entry in it:
            stem, dot, ext = entry.name.partition(".")
            ext = f".{ext.lower()}"
            if dot and ext in extensions and stem.isdigit() and str(int(stem)) == stem:
                old = found.get(int(stem))
                if old is None or extensions.index(ext) < extensions.index(old.suffix.lower()):
                    found[int(stem)] = Path(entry.path)
    return found
