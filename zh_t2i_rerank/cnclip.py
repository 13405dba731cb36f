"""``--scorer cnclip:ARCH:WEIGHTS``: Chinese-CLIP (the optional ``cn_clip`` package), built offline from its config,
with a weights file the user provides."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from torch import nn

from zh_t2i_base.cli import UserError
from zh_t2i_base.device import resolve_device
from zh_t2i_rerank.scorer import EmbeddingScorer, fast_image_tower, need_args

USAGE = "cnclip:ARCH:WEIGHTS"
HELP = "Chinese-CLIP (pip install '.[cnclip]'): ARCH a cn_clip model name or a .json config, WEIGHTS its file"


# Chinese-CLIP: its named models (vision config @ text config, input resolution), as cn_clip documents them.
CNCLIP_MODELS = {
    "RN50": ("RN50@RBT3-chinese", 224),
    "ViT-B-16": ("ViT-B-16@RoBERTa-wwm-ext-base-chinese", 224),
    "ViT-L-14": ("ViT-L-14@RoBERTa-wwm-ext-base-chinese", 224),
    "ViT-L-14-336": ("ViT-L-14-336@RoBERTa-wwm-ext-base-chinese", 336),
    "ViT-H-14": ("ViT-H-14@RoBERTa-wwm-ext-large-chinese", 224),
}
CNCLIP_CONTEXT_LENGTH = 52


def cnclip_model_info(arch: str) -> dict:
    """cn_clip ``CLIP(**info)`` keyword arguments for ``arch``: a name of :data:`CNCLIP_MODELS`, ``VISION@TEXT``
    (cn_clip's config names) or a JSON file holding the merged vision + text config (e.g. a small test model)."""
    import cn_clip.clip

    if arch.endswith(".json"):
        p = Path(arch)
        if not p.is_file():
            raise UserError(f"cnclip architecture file not found: {p}")
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{p}: not a JSON model config ({e})") from None
    else:
        struct = CNCLIP_MODELS.get(arch, (arch, 0))[0]
        vision, _, text = struct.partition("@")
        root = Path(cn_clip.clip.__file__).parent / "model_configs"
        files = [root / f"{vision}.json", root / f"{text}.json"]
        if not text or not all(f.is_file() for f in files):
            raise UserError(f"unknown cnclip architecture {arch!r}; use one of {', '.join(CNCLIP_MODELS)}, "
                            f"VISION@TEXT from cn_clip's model_configs, or a .json config file")
        info = {}
        for f in files:
            info.update(json.loads(f.read_text(encoding="utf-8")))
    if isinstance(info.get("vision_layers"), str):  # cn_clip writes ResNet stage depths as a string "[3,4,6,3]"
        info["vision_layers"] = json.loads(info["vision_layers"])
    return info


def load_cnclip(arch: str, weights: str, trust_checkpoint: bool = False) -> tuple[nn.Module, int]:
    """A cn_clip model built offline from its config, with the user's weights file loaded strictly; its resolution."""
    from cn_clip.clip.model import CLIP

    info = cnclip_model_info(arch)
    p = Path(weights)
    if not p.is_file():
        raise UserError(f"cnclip weights not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad or pickled files
        hint = "" if trust_checkpoint else " (if you trust the file, pass --trust-checkpoint)"
        raise UserError(f"{p}: not a loadable weights file ({str(e).splitlines()[0] if str(e) else e}){hint}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise UserError(f"{p}: no state_dict in this file")
    state = {k.removeprefix("module."): v for k, v in state.items() if "bert.pooler" not in k}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = CLIP(**info)
    except TypeError as e:
        raise UserError(f"cnclip architecture {arch}: bad config ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{p}: weights do not match cnclip architecture {arch} ({str(e).splitlines()[0]})") from None
    resolution = CNCLIP_MODELS.get(arch, (None, 0))[1] or int(info["image_resolution"])
    return model.float().eval(), resolution


def make_scorer(args: list[str], device: str = "auto", batch_size: int = 32,
                trust_checkpoint: bool = False, precision: str = "fp32") -> EmbeddingScorer:
    """``cnclip:ARCH:WEIGHTS``: Chinese-CLIP (the optional ``cn_clip`` package) with a weights file you provide;
    cn_clip's own preprocessing (squash-resize, bicubic, OpenAI mean/std) and tokenizer (length 52)."""
    arch, weights = need_args(args, ["ARCH", "WEIGHTS"], "cnclip")
    try:
        import cn_clip.clip as cn
    except ModuleNotFoundError as e:
        raise UserError(f"scorer 'cnclip' needs the optional cn_clip package (pip install '.[cnclip]'); "
                        f"missing module {e.name!r}") from None
    dev = resolve_device(device)
    model, resolution = load_cnclip(arch, weights, trust_checkpoint)
    model.to(dev)
    model.visual = fast_image_tower(model.visual, resolution, dev)
    return EmbeddingScorer(cn.image_transform(resolution), model.encode_image,
                           lambda t: model.encode_text(cn.tokenize([t], context_length=CNCLIP_CONTEXT_LENGTH).to(dev)),
                           dev, batch_size, precision)
