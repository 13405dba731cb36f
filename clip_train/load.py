"""Load a trained CLIP back from a run directory, a ``ckpt-*.pt`` or a ``model.safetensors``: the file alone is enough.

Every checkpoint of ``python -m clip_train`` carries, in its ``meta``: the open_clip config and the name it is
registered under, the tokenizer (as a ``tokenizers`` JSON string), the context length and, for an HF text tower, the
HF config, so neither the training data nor the original text-model directory is needed to score images.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from clip_train.model import create, image_size_of, register
from form_data.tokenizer import ChineseTokenizer
from zh_t2i_base import checkpoint as ckpt
from zh_t2i_base.cli import UserError, user_errors


@dataclass
class LoadedClip:
    model: nn.Module  # an open_clip CLIP / CustomTextCLIP in eval mode
    tokenizer: ChineseTokenizer
    context_length: int
    image_size: int
    meta: dict


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, meta)`` of one of our CLIP checkpoints (run directory, ``ckpt-*.pt`` or ``model.safetensors``);
    UserError for anything else."""
    meta, state, p = ckpt.read_weights(path, "model", "model.safetensors", "CLIP checkpoint")
    if meta.get("kind") != "clip":
        raise UserError(f"{p}: not a CLIP checkpoint of `python -m clip_train` (kind {meta.get('kind')!r})")
    return state, meta


def check_tokenizer(model: nn.Module, tokenizer: ChineseTokenizer, context_length: int) -> None:
    """An HF text tower must fit the tokenizer: ids inside its embedding table, the pad id it masks, the length."""
    hf_config = getattr(getattr(model, "text", None), "config", None)
    if hf_config is not None:
        if context_length > hf_config.max_position_embeddings:
            raise UserError(f"--context-length {context_length} exceeds the text model's max_position_embeddings "
                            f"{hf_config.max_position_embeddings}")
        if tokenizer.vocab_size > hf_config.vocab_size:
            raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the text model only {hf_config.vocab_size}")
        if hf_config.pad_token_id != tokenizer.pad_id:
            raise UserError(f"tokenizer [PAD] id {tokenizer.pad_id} differs from the text model's pad_token_id "
                            f"{hf_config.pad_token_id}")


def tokenizer_from_meta(meta: dict) -> ChineseTokenizer:
    return ChineseTokenizer(Tokenizer.from_str(meta["tokenizer"]), "checkpoint tokenizer")


def register_checkpoint(path: str | os.PathLike) -> str:
    """Register the checkpoint's config with open_clip and return its name, so that
    ``open_clip.create_model_and_transforms(name, pretrained=".../model.safetensors")`` rebuilds it."""
    _, meta = read(path)
    with user_errors(ValueError):
        register(meta["name"], meta["model_cfg"])
    return meta["name"]


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedClip:
    """Rebuild model + tokenizer from one checkpoint file (or run directory), weights loaded strictly."""
    state, meta = read(path)
    cfg = json.loads(json.dumps(meta["model_cfg"]))
    with tempfile.TemporaryDirectory(prefix="clip-hf-") as tmp:
        if meta.get("hf_config"):  # the HF tower is rebuilt from its stored config, not the original directory
            Path(tmp, "config.json").write_text(json.dumps(meta["hf_config"]), encoding="utf-8")
            cfg["text_cfg"]["hf_model_name"] = tmp
        with user_errors(ValueError):
            model = create(meta["name"], cfg, pretrained_text=False)
            register(meta["name"], meta["model_cfg"])  # leave open_clip's registry pointing at the original config
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match the stored config ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    return LoadedClip(model, tokenizer_from_meta(meta), int(meta["context_length"]), image_size_of(model), meta)
