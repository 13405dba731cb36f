"""The original BriVL preprocessing (``XYBDataset_all``, phase 'val'), as tensors ready for :class:`BriVL`.

Image: RGB (PIL ``convert``, truncated files allowed) -> [0, 1] -> resize to IMG_SIZE x IMG_SIZE, bilinear, no
antialias, aspect not kept -> ImageNet normalisation. Boxes: the first MAX_IMG_LEN-1 detector boxes rescaled to the
resized frame, then the whole-image box, then zero boxes up to MAX_IMG_LEN; mask = 1 for the valid rows. Text:
[CLS] tokens [SEP] [PAD]... to MAX_TEXT_LEN; mask = 1 up to and including the [SEP].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch import Tensor

from brivl_infer.model import IMAGENET_MEAN, IMAGENET_STD, BriVLConfig, ImageInput
from form_data.tokenizer import ChineseTokenizer
from zh_t2i_base.cli import UserError


def open_image(src: ImageInput) -> Image.Image:
    """An RGB image as the original gets it: ``Image.open(path).convert('RGB')`` (alpha dropped, not composited)."""
    if isinstance(src, Image.Image):
        return src if src.mode == "RGB" else src.convert("RGB")
    path = Path(src)
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # the original dataset sets this globally
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def image_tensor(img: Image.Image, size: int) -> Tensor:
    """[3, size, size] float32: ToTensor, bilinear resize without antialias, ImageNet normalisation."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return x.sub(mean).div(std)


def box_tensor(boxes: np.ndarray | Sequence | None, width: int, height: int, cfg: BriVLConfig
               ) -> tuple[Tensor, Tensor]:
    """(boxes [MAX_IMG_LEN, 4] float32 in the resized frame, mask [MAX_IMG_LEN] 1/0) for an image of that size."""
    size, slots = cfg.img_size, cfg.max_img_len
    arr = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise UserError(f"boxes must be a list of [x1, y1, x2, y2], got an array of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise UserError("boxes hold a non-finite coordinate")
    arr = arr[: slots - 1] * np.array([size / width, size / height, size / width, size / height])
    out = np.zeros((slots, 4), dtype=np.float32)
    out[: len(arr)] = arr.astype(np.float32)
    out[len(arr)] = (0, 0, size, size)
    mask = torch.zeros(slots)
    mask[: len(arr) + 1] = 1
    return torch.from_numpy(out), mask


def prepare_image(src: ImageInput, boxes: np.ndarray | Sequence | None, cfg: BriVLConfig
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(image [3, S, S], boxes [MAX_IMG_LEN, 4], mask [MAX_IMG_LEN]) of one image."""
    img = open_image(src)
    b, m = box_tensor(boxes, img.width, img.height, cfg)
    return image_tensor(img, cfg.img_size), b, m


def prepare_images(images: Sequence[ImageInput], boxes: Sequence | None, cfg: BriVLConfig
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked :func:`prepare_image` of a batch (``boxes`` None: whole-image box only)."""
    items = [prepare_image(img, None if boxes is None else boxes[i], cfg) for i, img in enumerate(images)]
    x, b, m = zip(*items, strict=True)
    return torch.stack(x), torch.stack(b), torch.stack(m)


def prepare_texts(tokenizer: ChineseTokenizer, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """(ids [B, max_len], mask [B, max_len]): [CLS] ... [SEP] [PAD]..., mask 1 through the final [SEP]."""
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise UserError(f"texts must be strings, got {bad[0]}")
    ids = tokenizer.encode(list(texts), max_len, special=True)
    is_sep = (ids == tokenizer.sep_id).int()
    length = max_len - is_sep.flip(1).argmax(1)  # one past the last [SEP] (the one encode appended)
    mask = (torch.arange(max_len)[None] < length[:, None]).float()
    return ids, mask
