"""``load_image_tokenizer``: any image tokenizer checkpoint of the toolkit, without the caller knowing its kind.

Accepted: a run directory of ``python -m vae_train`` (its newest checkpoint), one of its ``ckpt-*.pt`` files or its
``model.safetensors`` export, and a taming-transformers pair (``last.ckpt`` + ``model.yaml``, or a directory holding
them, e.g. the public ImageNet f16-1024 model). Kinds of other packages (Styled-VQ) register a loader here by name,
so this module never imports them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from form_data.cli import UserError
from train_runtime import checkpoint as ckpt
from vae_train.model import VQGAN, DiscreteVAE, DVAEConfig, ImageTokenizer, VQGANConfig

# kind -> "module:function(meta: dict, state_dict: dict) -> ImageTokenizer" for tokenizers of other packages
EXTERNAL_KINDS = {"styled_vq": "styled_vq.model:tokenizer_from_checkpoint"}


def build_tokenizer(meta: dict, state_dict: dict) -> ImageTokenizer:
    """Rebuild a tokenizer from a checkpoint's ``meta`` (kind + model config) and its weights."""
    kind = meta.get("kind")
    if kind in ("dvae", "vqgan"):
        cfg = meta["config"]
        model = DiscreteVAE(DVAEConfig(**cfg)) if kind == "dvae" else VQGAN(VQGANConfig(**cfg))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise UserError(f"checkpoint weights do not match its {kind} config: {str(e).splitlines()[0]}") from None
        if kind == "vqgan" and meta.get("image_size"):
            model.image_size = int(meta["image_size"])
        return model.eval()
    if kind in EXTERNAL_KINDS:
        module, func = EXTERNAL_KINDS[kind].split(":")
        return getattr(importlib.import_module(module), func)(meta, state_dict)
    raise UserError(f"unknown image tokenizer kind {kind!r} (known: dvae, vqgan, {', '.join(EXTERNAL_KINDS)})")


def load_image_tokenizer(path: str | os.PathLike, yaml_path: str | os.PathLike | None = None,
                         trust_checkpoint: bool = False, device: str | torch.device = "cpu") -> ImageTokenizer:
    """Load any of our image tokenizers (see the module docstring); returns it in eval mode on ``device``."""
    from vae_train.convert import load_vqgan

    p = Path(path)
    if not p.exists():
        raise UserError(f"image tokenizer not found: {p}")
    if p.is_dir() and not ckpt.checkpoints(p) and not (p / "model.safetensors").is_file():
        ckpts, yamls = sorted(p.glob("**/*.ckpt")), sorted(p.glob("**/*.yaml"))
        if len(ckpts) == 1 and len(yamls) == 1:
            return load_vqgan(ckpts[0], yamls[0], trust_checkpoint=trust_checkpoint).to(device).eval()
        raise UserError(f"{p}: no checkpoint of ours (ckpt-*.pt, model.safetensors) and no single taming "
                        f".ckpt + .yaml pair in it")
    if yaml_path is not None or p.suffix == ".ckpt":
        return load_vqgan(p, yaml_path, trust_checkpoint=trust_checkpoint).to(device).eval()
    meta, state, _ = ckpt.read_weights(p, "model", "model.safetensors", "image tokenizer")
    return build_tokenizer(meta, state).to(device).eval()
