"""``--scorer brivl:CFG_YML:CHECKPOINT``: BriVL-1.0 with the original yml and checkpoint (see :mod:`brivl_infer`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from zh_t2i_rerank.scorer import need_args

USAGE = "brivl:CFG_YML:CHECKPOINT"
HELP = "BriVL-1.0: the original yml (MODEL.ENCODER found beside it) and its checkpoint"


class BriVLScorer:
    """``score(text, images)``: cosine similarity per image (float32 [N], higher = better); the text is encoded
    once, the images in batches of ``batch_size`` with the whole-image box."""

    def __init__(self, model, batch_size: int = 32):
        self.model = model
        self.batch_size = batch_size

    def score(self, text: str, images: Sequence[Image.Image]) -> np.ndarray:
        return self.model.score(text, images, batch_size=self.batch_size)


def make_scorer(args: list[str], device: str = "auto", batch_size: int = 32,
                trust_checkpoint: bool = False, precision: str = "fp32") -> BriVLScorer:
    """The scorer of ``brivl:CFG_YML:CHECKPOINT`` (``args`` = [CFG_YML, CHECKPOINT])."""
    from brivl_infer.load import load_brivl

    cfg, checkpoint = need_args(args, ["CFG_YML", "CHECKPOINT"], "brivl")
    return BriVLScorer(load_brivl(cfg, checkpoint, device=device, trust_checkpoint=trust_checkpoint,
                                  precision=precision), batch_size)
