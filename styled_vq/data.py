"""Image sets for Styled-VQ: every ``form_data`` format plus the original's JSON list of image paths."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from form_data.datasets import JsonImageList, open_dataset


def open_images(path: str | os.PathLike, transform=None, image_size: int = 256) -> Dataset:
    """A ``.json`` list of paths, or anything :func:`form_data.datasets.open_dataset` reads."""
    if Path(path).suffix.lower() == ".json":
        return JsonImageList(path, transform=transform, image_size=image_size)
    return open_dataset(path, transform=transform, image_size=image_size)
