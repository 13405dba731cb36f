"""Text -> images with a trained DALLE checkpoint: loading, the ``generate`` API and the outputs of ``dalle_gen.py``.

A checkpoint alone is enough: its ``meta`` holds the model config, the text vocabulary and the image tokenizer's
path (overridable when the tokenizer has moved).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from dalle_train.model import DALLE, DALLEConfig
from dalle_train.sample import sample_tokens, top_k_count
from form_data.tokenizer import ChineseTokenizer, load_tokenizer, tokenizer_from_tokens, vocab_digest
from zh_t2i_base import checkpoint as ckpt
from zh_t2i_base.cli import UserError
from zh_t2i_base.device import resolve_device
from zh_t2i_base.fileio import StagedFiles, ensure_writable_dir, write_json
from zh_t2i_base.images import save_image_grid, to_pil


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, Path]:
    """(meta, state_dict, file) of a DALLE run directory (newest ckpt), a ``ckpt-*.pt`` or a ``dalle.safetensors``."""
    meta, state, p = ckpt.read_weights(path, "dalle", "dalle.safetensors", "DALLE checkpoint")
    if meta.get("kind") != "dalle":
        raise UserError(f"{p}: not a DALLE checkpoint of this toolkit (kind {meta.get('kind')!r})")
    return meta, state, p


@dataclass
class DalleBundle:
    """A loaded DALLE with the two tokenizers it needs."""

    model: DALLE
    text_tokenizer: ChineseTokenizer
    image_tokenizer: torch.nn.Module
    checkpoint: Path
    meta: dict = field(repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.text_emb.weight.device


def load_dalle(path: str | os.PathLike, device: str | torch.device = "auto", vocab: str | None = None,
               image_tokenizer: str | None = None, image_tokenizer_yaml: str | None = None,
               trust_checkpoint: bool = False) -> DalleBundle:
    """Load a DALLE checkpoint and its tokenizers. ``vocab`` (optional) must be the vocabulary it was trained with;
    ``image_tokenizer`` overrides the recorded path."""
    from vae_train.load import load_image_tokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    meta, state, file = read_checkpoint(path)
    try:
        cfg = DALLEConfig(**meta["config"])
        model = DALLE(cfg)
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{file}: weights do not match the stored DALLE config ({str(e).splitlines()[0]})") from None
    text_meta = meta["text_tokenizer"]
    if vocab:
        tok = load_tokenizer(vocab)
        if vocab_digest(tok.vocab_tokens()) != text_meta["sha1"]:
            raise UserError(f"vocab mismatch: {vocab} ({tok.vocab_size} ids) is not the vocabulary {file} was trained "
                            f"with ({text_meta['vocab_size']} ids from {text_meta['source']})")
    else:
        tok = tokenizer_from_tokens(text_meta["vocab"], f"vocab stored in {file}")
    if tok.vocab_size != cfg.num_text_tokens:
        raise UserError(f"vocab mismatch: {tok.vocab_size} ids, the model has {cfg.num_text_tokens} text tokens")
    ref = meta["image_tokenizer"]
    tok_path = image_tokenizer or ref["path"]
    yaml = image_tokenizer_yaml if image_tokenizer else (ref.get("yaml") or None)
    if not Path(tok_path).exists():
        raise UserError(f"image tokenizer {tok_path} (recorded in {file}) not found: pass its new place with "
                        f"--image-tokenizer")
    itok = load_image_tokenizer(tok_path, yaml, trust_checkpoint=trust_checkpoint, device=dev)
    if int(itok.num_tokens) != cfg.num_image_tokens or int(itok.seq_len) != cfg.image_seq_len:
        raise UserError(f"image tokenizer {tok_path} has {itok.num_tokens} codes x {itok.seq_len} tokens, the DALLE "
                        f"model expects {cfg.num_image_tokens} x {cfg.image_seq_len}")
    return DalleBundle(model.to(dev).eval(), tok, itok, file, meta)


@dataclass
class Generation:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    seeds: list[int]
    text_ids: torch.Tensor  # [text_seq_len]
    truncated: bool

    def pil(self) -> list[Image.Image]:
        return to_pil(self.images)


def generate(bundle: DalleBundle, text: str, n: int, *, seed: int = 0, batch_size: int = 32, top_k: int | None = None,
             filter_thres: float | None = None, temperature: float = 1.0, cond_scale: float = 1.0,
             progress: bool = False) -> Generation:
    """``n`` images for ``text``; image ``i`` uses seed ``seed + i`` (reproducible, independent of batch size)."""
    if n < 1:
        raise UserError(f"the number of images must be >= 1, got {n}")
    if not text.strip():
        raise UserError("the text is empty")
    cfg = bundle.model.cfg
    ids, cut = bundle.text_tokenizer.encode(text, cfg.text_seq_len, return_truncated=True)
    if bool(cut[0]):
        warnings.warn(f"the text is longer than {cfg.text_seq_len} tokens; it was truncated to "
                      f"{bundle.text_tokenizer.decode(ids[0])!r}", stacklevel=2)
    seeds = [seed + i for i in range(n)]
    try:
        tokens = sample_tokens(bundle.model, ids, seeds, batch_size=batch_size, top_k=top_k,
                               filter_thres=filter_thres, temperature=temperature, cond_scale=cond_scale,
                               progress=progress)
    except ValueError as e:
        raise UserError(str(e)) from None
    images = []
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            images.append(bundle.image_tokenizer.decode(tokens[lo:lo + batch_size].to(bundle.device)).float().cpu())
    return Generation(torch.cat(images), seeds, ids[0], bool(cut[0]))


def write_outputs(gen: Generation, out_dir: str | os.PathLike, text: str, settings: dict, checkpoint: Path,
                  image_format: str = "png") -> list[Path]:
    """``DIR/{i}.{png|jpg}``, ``DIR/grid.png`` and ``DIR/meta.json``, all or nothing (staged, then renamed)."""
    if image_format not in ("png", "jpg"):
        raise UserError(f"--format must be png or jpg, got {image_format!r}")
    out = ensure_writable_dir(out_dir)
    paths = []
    with StagedFiles() as st:
        for i, img in enumerate(gen.pil()):
            path = out / f"{i}.{image_format}"
            img.save(st.path(path), format="PNG" if image_format == "png" else "JPEG", quality=95)
            paths.append(path)
        save_image_grid(gen.images, st.path(out / "grid.png"), nrow=min(8, len(paths)))
        meta = {"prompt": text, "text_ids": gen.text_ids.tolist(), "truncated": gen.truncated, "n": len(paths),
                "images": [p.name for p in paths], "seeds": gen.seeds, "checkpoint": str(checkpoint),
                "settings": settings}
        write_json(st.path(out / "meta.json"), meta)
        st.commit()
    return paths


def settings_dict(bundle: DalleBundle, **kw) -> dict:
    """The sampling settings as meta.json records them (with the resolved top-k)."""
    k = top_k_count(bundle.model.cfg.num_image_tokens, kw.get("top_k"), kw.get("filter_thres"))
    return {**kw, "top_k_resolved": k, "device": str(bundle.device)}

