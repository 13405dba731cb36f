"""Image sets for Styled-VQ: every ``form_data`` format plus the original's JSON list of image paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch.utils.data import Dataset

from form_data.datasets import _ListedImages, _listing, open_dataset
from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import utf8_error


class JsonImageList(_ListedImages):
    """The original training data format: a JSON file holding a flat list of image paths (absolute, or relative to
    the file's directory). Captions are empty."""

    def __init__(self, path: str | os.PathLike, transform=None, image_size: int = 256):
        p = _listing(path)
        try:
            paths = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise utf8_error(p) from None
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
            raise UserError(f"{p}: expected a JSON list of image paths")
        super().__init__(p.parent, paths, None, str(p), transform, image_size)


def open_images(path: str | os.PathLike, transform=None, image_size: int = 256) -> Dataset:
    """A ``.json`` list of paths, or anything :func:`form_data.datasets.open_dataset` reads."""
    if Path(path).suffix.lower() == ".json":
        return JsonImageList(path, transform=transform, image_size=image_size)
    return open_dataset(path, transform=transform, image_size=image_size)
