"""BriVL as a user gets it: the towers of :mod:`brivl_infer.model` plus the original preprocessing, batching, the
inference precision, BatchNorm folding and scoring (``encode_images``, ``encode_texts``, ``score``). Build one with
:func:`brivl_infer.load.load_brivl`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from brivl_infer.model import BriVLConfig, BriVLTowers, ImageInput
from brivl_infer.preprocess import prepare_images, prepare_texts
from form_data.tokenizer import ChineseTokenizer
from zh_t2i_base.precision import PRECISIONS, autocast, fold_batchnorm


class BriVL(BriVLTowers):
    """Both inference towers (state-dict keys ``imgencoder.*`` / ``textencoder.*`` as in ``checkpoint['learnable']``)
    plus the preprocessing of the original, batched: ``encode_images``, ``encode_texts``, ``score``.

    ``precision`` "fp16"/"bf16" runs the towers under autocast (meant for CUDA); embeddings come back float32.
    """

    def __init__(self, cfg: BriVLConfig, tokenizer: ChineseTokenizer | None = None, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.precision = precision
        self.folded = False

    def fold_batchnorm(self) -> BriVL:
        """Fold the CNN's BatchNorms into its convs (inference only; call after the weights are loaded): about 1.3x
        faster image embeddings on CPU, equal to ~1e-6. :func:`load_brivl` does it."""
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        before = self.imgencoder.backbone
        self.imgencoder.backbone = fold_batchnorm(before, lambda m: m.forward_features(x))
        self.folded = self.imgencoder.backbone is not before
        return self

    def _autocast(self):
        return autocast(self.device, self.precision)

    def image_features(self, images: Tensor, boxes: Tensor, mask: Tensor) -> Tensor:
        with self._autocast():
            return super().image_features(images, boxes, mask)

    def text_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        with self._autocast():
            return super().text_features(ids, mask)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput], boxes: Sequence[np.ndarray | None] | None = None,
                      batch_size: int = 32) -> Tensor:
        """Embeddings [N, D] (float32, unit rows, on the model's device) of PIL images or image paths.

        ``boxes[i]``: detector boxes [K, 4] (x1, y1, x2, y2) in image i's pixels, or None; without boxes each image
        is its whole-image box alone.
        """
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got {len(boxes)} box arrays for {len(images)} images")
        out = []
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            x, b, m = prepare_images(images[start:stop], None if boxes is None else boxes[start:stop], self.config)
            out.append(self.image_features(x.to(self.device), b.to(self.device), m.to(self.device)))
        return torch.cat(out) if out else torch.zeros(0, self.config.img_feature_dim, device=self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """Embeddings [N, D] (float32, unit rows, on the model's device) of texts, cut to MODEL.MAX_TEXT_LEN tokens."""
        if self.tokenizer is None:
            raise ValueError("this BriVL has no tokenizer; pass one to BriVL(...) or load_brivl")
        out = []
        for start in range(0, len(texts), batch_size):
            ids, m = prepare_texts(self.tokenizer, texts[start:start + batch_size], self.config.max_text_len)
            out.append(self.text_features(ids.to(self.device), m.to(self.device)))
        return torch.cat(out) if out else torch.zeros(0, self.config.img_feature_dim, device=self.device)

    def score(self, text: str, images: Sequence[ImageInput], boxes: Sequence[np.ndarray | None] | None = None,
              batch_size: int = 32) -> np.ndarray:
        """Cosine similarity of ``text`` (encoded once) with each image: float32 [N], higher = better."""
        t = self.encode_texts([text])
        v = self.encode_images(images, boxes, batch_size=batch_size)
        return (v @ t[0]).float().cpu().numpy()
