"""Reranking scorers: one protocol, a registry of factories, the CLIP and Chinese-CLIP scorers.

``--scorer PREFIX:ARG[:ARG...]`` picks a factory from :data:`SCORERS` (imported only when used) and calls it as
``factory(args, device=..., batch_size=..., trust_checkpoint=..., precision=...)`` with the colon-split remainder:
``clip:CKPT`` -> ``[CKPT]``, ``cnclip:ARCH:WEIGHTS`` -> ``[ARCH, WEIGHTS]``, ``brivl:CFG:CKPT`` -> ``[CFG, CKPT]``.
A scorer's ``score(text, images)`` encodes the text once and the images in batches and returns one finite float per
image, higher = better. Adding a scorer is one entry in :data:`SCORERS`.

Speed on CPU (exact in fp32): a conv image tower gets its BatchNorms folded into its convs and channels-last weights,
and runs a few images at a time so its activations stay in cache, while the text is encoded once. ``precision``
"bf16"/"fp16" runs the towers under autocast (CUDA, or a CPU with AVX512-BF16/AMX for bf16); scores then differ from
fp32 by ~1e-3.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from form_data.cli import UserError
from form_data.datasets import default_transform
from form_data.inference import PRECISIONS, autocast, fold_batchnorm

SCORERS: dict[str, str] = {
    "clip": "clip_train.scorers:make_clip_scorer",
    "cnclip": "clip_train.scorers:make_cnclip_scorer",
    "brivl": "brivl_infer.scorer:make_scorer",
}
USAGE = "clip:CKPT | cnclip:ARCH:WEIGHTS | brivl:CFG:CKPT"


class Scorer(Protocol):
    def score(self, text: str, images: list[Image.Image]) -> np.ndarray:
        """One finite float per image (higher = better); the text is encoded once, the images in batches."""
        ...


def split_spec(spec: str) -> tuple[str, list[str]]:
    """``"cnclip:ViT-B-16:w.pt"`` -> ``("cnclip", ["ViT-B-16", "w.pt"])``; UserError for an unknown prefix."""
    prefix, _, rest = spec.partition(":")
    if prefix not in SCORERS:
        raise UserError(f"unknown scorer {prefix!r} in --scorer {spec!r}; use {USAGE}")
    return prefix, rest.split(":") if rest else []


def make_scorer(spec: str, device: str = "auto", batch_size: int = 32, trust_checkpoint: bool = False,
                precision: str = "fp32") -> Scorer:
    """The scorer for ``--scorer`` ``spec`` (its factory is imported here, on first use)."""
    prefix, args = split_spec(spec)
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    module_name, _, func_name = SCORERS[prefix].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UserError(f"scorer {prefix!r} is not available: module {e.name!r} is not installed") from None
    factory: Callable[..., Scorer] = getattr(module, func_name)
    return factory(args, device=device, batch_size=batch_size, trust_checkpoint=trust_checkpoint, precision=precision)


def _need(args: list[str], names: Sequence[str], prefix: str) -> list[str]:
    if len(args) != len(names) or not all(args):
        raise UserError(f"--scorer {prefix}:{':'.join(args)}: expected {prefix}:{':'.join(names)}")
    return args


class EmbeddingScorer:
    """Cosine similarity of one text embedding with batched image embeddings; the model-specific parts are passed in:
    ``preprocess`` (PIL -> tensor [3, H, W]), ``encode_images`` (batch -> [B, D]), ``encode_text`` (str -> [1, D]).
    On CPU a batch goes through ``encode_images`` in chunks of about :attr:`cpu_chunk_pixels` input pixels (measured:
    RN50 at 224 px is 1.2-1.5x faster per image 4-8 images at a time than at batch 32, whose activations fall out
    of cache; a 64 px tower is fastest at the whole batch)."""

    cpu_chunk_pixels = 8 * 224 * 224

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor],
                 encode_images: Callable[[torch.Tensor], torch.Tensor], encode_text: Callable[[str], torch.Tensor],
                 device: torch.device, batch_size: int = 32, precision: str = "fp32"):
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self.preprocess, self.encode_images, self.encode_text = preprocess, encode_images, encode_text
        self.device, self.batch_size, self.precision = device, batch_size, precision
        self._threads: ThreadPoolExecutor | None = None

    def _prep(self, img: Image.Image) -> torch.Tensor:
        return self.preprocess(img if img.mode == "RGB" else img.convert("RGB"))

    def _pool(self) -> ThreadPoolExecutor:
        """Threads for the PIL resizes (which release the GIL): one per core, at most 8."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="preprocess")
        return self._threads

    def _images(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        step = max(1, self.cpu_chunk_pixels // (batch.shape[-1] * batch.shape[-2])) if self.device.type == "cpu" \
            else len(batch)
        return torch.cat([self.encode_images(batch[i:i + step]) for i in range(0, len(batch), step)])

    @torch.inference_mode()
    def score(self, text: str, images: list[Image.Image]) -> np.ndarray:
        with autocast(self.device, self.precision):
            text_feature = torch.nn.functional.normalize(self.encode_text(text).float(), dim=-1)
        scores = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack(list(self._pool().map(self._prep, images[i:i + self.batch_size])))
            with autocast(self.device, self.precision):
                feats = self._images(batch)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            scores.append((feats @ text_feature.T).squeeze(1).cpu())
        return torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0)


def fast_image_tower(tower: nn.Module, image_size: int, device: torch.device) -> nn.Module:
    """``tower`` (eval mode, weights loaded) with its BatchNorms folded into its convs and channels-last weights;
    checked on a probe image against the original (see :func:`form_data.inference.fold_batchnorm`)."""
    x = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    return fold_batchnorm(tower, lambda m: m(x)).to(memory_format=torch.channels_last)


def _device(device: str) -> torch.device:
    from train_runtime.distributed import resolve_device

    return resolve_device(device)


def make_clip_scorer(args: list[str], device: str = "auto", batch_size: int = 32,
                     trust_checkpoint: bool = False, precision: str = "fp32") -> EmbeddingScorer:
    """``clip:CKPT``: a run directory / ``ckpt-*.pt`` / ``model.safetensors`` of ``python -m clip_train``.

    Our checkpoints always load with ``weights_only=True``; ``trust_checkpoint`` is accepted for the common factory
    signature and not needed."""
    from clip_train.load import load_clip
    from clip_train.model import normalize

    (path,) = _need(args, ["CKPT"], "clip")
    dev = _device(device)
    clip = load_clip(path, dev)
    model, tok, length = clip.model, clip.tokenizer, clip.context_length
    model.visual = fast_image_tower(model.visual, clip.image_size, dev)
    return EmbeddingScorer(default_transform(clip.image_size),
                           lambda x: model.encode_image(normalize(model, x)),
                           lambda t: model.encode_text(tok.encode([t], length).to(dev)), dev, batch_size, precision)


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


def make_cnclip_scorer(args: list[str], device: str = "auto", batch_size: int = 32,
                       trust_checkpoint: bool = False, precision: str = "fp32") -> EmbeddingScorer:
    """``cnclip:ARCH:WEIGHTS``: Chinese-CLIP (the optional ``cn_clip`` package) with a weights file you provide;
    cn_clip's own preprocessing (squash-resize, bicubic, OpenAI mean/std) and tokenizer (length 52)."""
    arch, weights = _need(args, ["ARCH", "WEIGHTS"], "cnclip")
    try:
        import cn_clip.clip as cn
    except ModuleNotFoundError as e:
        raise UserError(f"scorer 'cnclip' needs the optional cn_clip package (pip install '.[cnclip]'); "
                        f"missing module {e.name!r}") from None
    dev = _device(device)
    model, resolution = load_cnclip(arch, weights, trust_checkpoint)
    model.to(dev)
    model.visual = fast_image_tower(model.visual, resolution, dev)
    return EmbeddingScorer(cn.image_transform(resolution), model.encode_image,
                           lambda t: model.encode_text(cn.tokenize([t], context_length=CNCLIP_CONTEXT_LENGTH).to(dev)),
                           dev, batch_size, precision)
