"""open_clip model configs for Chinese CLIP: the toolkit's tiny configs, the Chinese text towers, registration.

A model is an open_clip config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``). Its image tower comes from a named
config (ours below, or any of open_clip's built-ins: RN50, ViT-B-32, ViT-B-16, ...); its text tower is either

* open_clip's own text transformer over our Chinese WordPiece tokenizer (``form_data.tokenizer``): causal attention,
  pooled at the ``[SEP]`` token (``pool_type="eos"``), vocab size and ids taken from the tokenizer; or
* a BERT/RoBERTa from a LOCAL Hugging Face directory (open_clip's ``HFTextEncoder``), pooled at ``[CLS]`` with a
  bias-free linear projection, as Chinese-CLIP does.

:func:`register` makes a config known to ``open_clip.create_model*`` by name, so a trained checkpoint loads back with
``open_clip.create_model_and_transforms(name, pretrained="RUN/model.safetensors")``. No file or network I/O here; bad
input is a ValueError.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import open_clip
import torch
from open_clip import factory as open_clip_factory
from torch import nn

# Our named configs (open_clip schema). The text tower's vocab_size / pad_id / eos_id are filled in from the tokenizer.
TINY_CONFIGS: dict[str, dict] = {
    # The demo's model: a 4-stage ModifiedResNet (RN50's design, one block per stage, width 8) at 64 px and a
    # 1-layer text transformer: 0.4 M parameters plus 64 per vocab entry.
    "zh-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        "text_cfg": {"context_length": 32, "width": 64, "heads": 2, "layers": 1},
    },
}
DEFAULT_CONTEXT_LENGTH = 52  # Chinese-CLIP's, for towers whose config does not set one of ours


def base_config(name: str) -> dict:
    """A copy of the named config: ours first, then open_clip's built-ins; ValueError listing the choices if unknown."""
    if name in TINY_CONFIGS:
        return copy.deepcopy(TINY_CONFIGS[name])
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(TINY_CONFIGS)}, RN50, ViT-B-32, "
                        f"ViT-B-16 or another open_clip config name")
    if "timm_model_name" in cfg.get("vision_cfg", {}) or "multimodal_cfg" in cfg:
        raise ValueError(f"--model {name}: only open_clip's own ResNet / ViT image towers are supported here")
    return cfg


def build_config(name: str, tokenizer, context_length: int = 0, image_size: int = 0,
                 text_model: str = "") -> dict:
    """The full open_clip config: the image tower of ``name`` + a Chinese text tower (see the module docstring);
    ``tokenizer`` gives the text tower its ``vocab_size``, ``pad_id`` and ``sep_id`` (a ``form_data`` ChineseTokenizer).

    ``text_model`` is a local HF model directory for an HF tower, else open_clip's text transformer is used with the
    width/heads/layers of ``name``'s text config. ``context_length`` / ``image_size`` of 0 keep the config's.
    """
    cfg = base_config(name)
    if image_size:
        cfg["vision_cfg"]["image_size"] = image_size
    vision = cfg["vision_cfg"]
    size = vision["image_size"]
    step = 32 if isinstance(vision.get("layers"), (list, tuple)) else vision.get("patch_size", 16)
    if not isinstance(size, int) or size < step or size % step:
        tower = "a ResNet tower downsamples 32x" if step == 32 else f"the ViT patch size is {step}"
        raise ValueError(f"--image-size {size} does not fit --model {name}: {tower}, so use a multiple of {step}")
    base_text = cfg.get("text_cfg", {})
    length = context_length or (base_text.get("context_length") if name in TINY_CONFIGS else DEFAULT_CONTEXT_LENGTH)
    if length < 3:
        raise ValueError(f"--context-length must be >= 3 ([CLS] text [SEP]), got {length}")
    if text_model:
        cfg["text_cfg"] = {"hf_model_name": text_model, "context_length": length,
                           "hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear"}
    else:
        keep = {k: base_text[k] for k in ("width", "heads", "layers", "mlp_ratio") if k in base_text}
        cfg["text_cfg"] = {**keep, "context_length": length, "vocab_size": tokenizer.vocab_size,
                           "pad_id": tokenizer.pad_id, "eos_id": tokenizer.sep_id, "pool_type": "eos"}
    cfg.pop("custom_text", None)
    return cfg


def open_clip_name(name: str, text_model: str = "") -> str:
    """The name our variant of ``name`` is registered under (never shadowing open_clip's own configs)."""
    return f"{name}-zh-hf" if text_model else f"{name}-zh"


def register(name: str, cfg: dict) -> None:
    """Make ``cfg`` known to open_clip's factory as ``name`` in this process.

    open_clip 3.x keeps its registry in ``open_clip.factory._MODEL_CONFIGS`` and offers only a file-based
    ``add_model_config``; entries put in directly survive its rescans.
    """
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"not an open_clip model config (needs embed_dim, vision_cfg, text_cfg): {sorted(cfg)}")
    open_clip_factory._MODEL_CONFIGS[name] = copy.deepcopy(cfg)


class _OpenClipNotes(logging.Filter):
    """open_clip logs 'No pretrained weights loaded ... initialized randomly' through the root logger on every build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING and "open_clip" in record.pathname)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    note_filter = _OpenClipNotes()
    logging.getLogger().addFilter(note_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(note_filter)


def create(name: str, cfg: dict, pretrained_text: bool = True) -> nn.Module:
    """Register ``cfg`` as ``name`` and build it with open_clip (random init; an HF tower loads its local weights
    when ``pretrained_text``)."""
    register(name, cfg)
    try:
        with _quiet_open_clip():
            return open_clip.create_model(name, pretrained_text=pretrained_text)
    except (OSError, ValueError) as e:  # transformers: a missing / malformed local model directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot build model {name}: {first}") from None


def normalize(model: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the model's input normalisation (open_clip's preprocess mean / std)."""
    visual = model.visual
    mean = torch.tensor(visual.image_mean, device=images01.device, dtype=images01.dtype).view(1, -1, 1, 1)
    std = torch.tensor(visual.image_std, device=images01.device, dtype=images01.dtype).view(1, -1, 1, 1)
    return (images01 - mean) / std


def image_size_of(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
