"""``load_image_tokenizer``: any image tokenizer checkpoint of the toolkit, without the caller knowing its kind.

Accepted: a run directory of ``python -m vae_train`` (its newest checkpoint), one of its ``ckpt-*.pt`` files or its
``model.safetensors`` export, and a taming-transformers pair (``last.ckpt`` + ``model.yaml``, or a directory holding
them, e.g. the public ImageNet f16-1024 model). The kind (dVAE, VQGAN, Styled-VQ ...) comes
from the checkpoint; :mod:`vae_train.registry` lists them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vae_train.protocol import ImageTokenizer
from vae_train.registry import TOKENIZERS
from zh_t2i_base import checkpoint as ckpt
from zh_t2i_base.cli import UserError


def build_tokenizer(meta: dict, state_dict: dict) -> ImageTokenizer:
    """Rebuild a tokenizer from a checkpoint's ``meta`` (kind + model config) and its weights."""
    kind = meta.get("kind")
    if kind not in TOKENIZERS:
        raise UserError(f"unknown image tokenizer kind {kind!r} (known: {', '.join(TOKENIZERS)})")
    try:
        return TOKENIZERS[kind].from_checkpoint(meta, state_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"not a usable {kind} checkpoint config ({e})") from None
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not match its {kind} config: {str(e).splitlines()[0]}") from None


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
