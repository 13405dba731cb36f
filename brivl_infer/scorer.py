"""BriVL as a reranking scorer (``--scorer brivl:CFG_YML:CHECKPOINT`` of ``clip_sort.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from brivl_infer.load import load_brivl
from brivl_infer.model import BriVL
from form_data.cli import UserError


class BriVLScorer:
    """``score(text, images)``: cosine similarity per image (float32 [N], higher = better); the text is encoded
    once, the images in batches of ``batch_size`` with the whole-image box."""

    def __init__(self, model: BriVL, batch_size: int = 32):
        self.model = model
        self.batch_size = batch_size

    def score(self, text: str, images: Sequence[Image.Image]) -> np.ndarray:
        return self.model.score(text, images, batch_size=self.batch_size)


def make_scorer(args: list[str], device: str = "auto", batch_size: int = 32,
                trust_checkpoint: bool = False, precision: str = "fp32") -> BriVLScorer:
    """The scorer of ``brivl:CFG_YML:CHECKPOINT`` (``args`` = [CFG_YML, CHECKPOINT])."""
    if len(args) != 2 or not all(args):
        raise UserError(f"the brivl scorer takes brivl:CFG_YML:CHECKPOINT, got {len(args)} argument(s) "
                        f"{':'.join(args)!r}")
    cfg, checkpoint = args
    return BriVLScorer(load_brivl(cfg, checkpoint, device=device, trust_checkpoint=trust_checkpoint,
                                  precision=precision), batch_size)
