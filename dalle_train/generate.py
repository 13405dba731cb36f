"""Text -> images with a trained DALLE checkpoint: loading, the ``generate`` API and the outputs of ``dalle_gen.py``.

A checkpoint alone is enough: its ``meta`` holds the model config, the text vocabulary and the image tokenizer's
path (overridable when the tokenizer has moved), and which generator it is (``meta["model_kind"]``: ``"dalle"``, the
autoregressive :class:`~dalle_train.model.DALLE`, or ``"masked"``, the MaskGIT-style
:class:`~dalle_train.masked.MaskedDALLE`; checkpoints from before the masked model have none and are ``"dalle"``).
The sampler follows the kind.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dalle_train.masked import MaskedDALLE
from dalle_train.masked_sample import DEFAULT_STEPS, ORDERS, sample_tokens_masked
from dalle_train.model import DALLE, DALLEConfig
from dalle_train.sample import sample_tokens, top_k_count
from form_data.tokenizer import ChineseTokenizer, load_tokenizer, tokenizer_from_tokens, vocab_digest
from zh_t2i_base import checkpoint as ckpt
from zh_t2i_base.cli import UserError
from zh_t2i_base.device import resolve_device
from zh_t2i_base.fileio import atomic_path, ensure_writable_dir, write_json
from zh_t2i_base.images import numbered_images, save_image_grid, to_pil


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, Path]:
    """(meta, state_dict, file) of a DALLE run directory (newest ckpt), a ``ckpt-*.pt`` or a ``dalle.safetensors``."""
    meta, state, p = ckpt.read_weights(path, "dalle", "dalle.safetensors", "DALLE checkpoint")
    if meta.get("kind") != "dalle":
        raise UserError(f"{p}: not a DALLE checkpoint of this toolkit (kind {meta.get('kind')!r})")
    return meta, state, p


MODELS = {"dalle": DALLE, "masked": MaskedDALLE}  # meta["model_kind"] -> the model class


def model_kind(meta: dict, file: str | os.PathLike = "checkpoint") -> str:
    """The generator a checkpoint holds: ``meta["model_kind"]``, ``"dalle"`` (autoregressive) when absent."""
    kind = meta.get("model_kind", "dalle")
    if kind not in MODELS:
        raise UserError(f"{file}: unknown DALLE model kind {kind!r} (known: {', '.join(MODELS)})")
    return kind


@dataclass
class DalleBundle:
    """A loaded DALLE (autoregressive or masked) with the two tokenizers it needs."""

    model: DALLE | MaskedDALLE
    text_tokenizer: ChineseTokenizer
    image_tokenizer: torch.nn.Module
    checkpoint: Path
    meta: dict = field(repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.text_emb.weight.device

    @property
    def kind(self) -> str:
        """``"dalle"`` (autoregressive) or ``"masked"``."""
        return "masked" if isinstance(self.model, MaskedDALLE) else "dalle"


def load_dalle(path: str | os.PathLike, device: str | torch.device = "auto", vocab: str | None = None,
               image_tokenizer: str | None = None, image_tokenizer_yaml: str | None = None,
               trust_checkpoint: bool = False) -> DalleBundle:
    """Load a DALLE checkpoint (either kind: the model class follows ``meta["model_kind"]``) and its tokenizers.
    ``vocab`` (optional) must be the vocabulary it was trained with; ``image_tokenizer`` overrides the recorded
    path."""
    from vae_train.load import load_image_tokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    meta, state, file = read_checkpoint(path)
    kind = model_kind(meta, file)
    try:
        cfg = DALLEConfig(**meta["config"])
        model = MODELS[kind](cfg)
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


def encode_prompt(bundle: DalleBundle, text: str) -> tuple[torch.Tensor, bool]:
    """(text ids [1, text_seq_len], truncated); warns when the text was cut to the model's text length."""
    if not text.strip():
        raise UserError("the text is empty")
    cfg = bundle.model.cfg
    ids, cut = bundle.text_tokenizer.encode(text, cfg.text_seq_len, return_truncated=True)
    if bool(cut[0]):
        warnings.warn(f"the text is longer than {cfg.text_seq_len} tokens; it was truncated to "
                      f"{bundle.text_tokenizer.decode(ids[0])!r}", stacklevel=3)
    return ids, bool(cut[0])


def sampler_options(bundle: DalleBundle, steps: int | None = None, unmask_order: str | None = None) -> dict:
    """The masked sampler's options resolved for ``bundle`` (defaults: :data:`DEFAULT_STEPS` steps, confidence
    order), or ``{}`` for an autoregressive model, which refuses them."""
    if bundle.kind != "masked":
        for flag, value in (("--steps", steps), ("--unmask-order", unmask_order)):
            if value is not None:
                raise UserError(f"{flag} is for masked checkpoints; {bundle.checkpoint} is autoregressive (kind dalle)")
        return {}
    order = unmask_order or ORDERS[0]
    if order not in ORDERS:
        raise UserError(f"--unmask-order must be one of {', '.join(ORDERS)}, got {order!r}")
    return {"steps": DEFAULT_STEPS if steps is None else steps, "order": order}


def generate_batches(bundle: DalleBundle, ids: torch.Tensor, indices: Iterable[int], *, seed: int = 0,
                     batch_size: int = 32, top_k: int | None = None, filter_thres: float | None = None,
                     temperature: float = 1.0, cond_scale: float = 1.0, steps: int | None = None,
                     unmask_order: str | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices, images [b, 3, H, W] in [0, 1] on the CPU)`` batch by batch for the image indices asked for;
    image ``i`` uses seed ``seed + i``, so it is the same image whatever the batch size or the other indices.
    ``steps`` / ``unmask_order``: masked models only (see :func:`sampler_options`)."""
    masked = sampler_options(bundle, steps, unmask_order)
    sampler = sample_tokens_masked if masked else sample_tokens
    it = iter(indices)
    while chunk := list(itertools.islice(it, batch_size)):
        try:
            tokens = sampler(bundle.model, ids, [seed + i for i in chunk], batch_size=len(chunk), top_k=top_k,
                             filter_thres=filter_thres, temperature=temperature, cond_scale=cond_scale, **masked)
        except ValueError as e:
            raise UserError(str(e)) from None
        with torch.no_grad():
            yield chunk, bundle.image_tokenizer.decode(tokens.to(bundle.device)).float().cpu()


def generate(bundle: DalleBundle, text: str, n: int, *, seed: int = 0, batch_size: int = 32, top_k: int | None = None,
             filter_thres: float | None = None, temperature: float = 1.0, cond_scale: float = 1.0,
             steps: int | None = None, unmask_order: str | None = None, progress: bool = False) -> Generation:
    """``n`` images for ``text`` in memory; image ``i`` uses seed ``seed + i`` (reproducible, independent of batch
    size). ``steps`` (default 12) and ``unmask_order`` (``"confidence"`` or ``"sequential"``) are for masked models
    only. For many images use :func:`write_images`, which streams them to disk."""
    if n < 1:
        raise UserError(f"the number of images must be >= 1, got {n}")
    ids, truncated = encode_prompt(bundle, text)
    batches = generate_batches(bundle, ids, list(range(n)), seed=seed, batch_size=batch_size, top_k=top_k,
                               filter_thres=filter_thres, temperature=temperature, cond_scale=cond_scale, steps=steps,
                               unmask_order=unmask_order)
    images = [imgs for _, imgs in tqdm(batches, total=-(-n // batch_size), desc="generating", unit="batch",
                                         disable=not progress, leave=False)]
    return Generation(torch.cat(images), [seed + i for i in range(n)], ids[0], truncated)


GRID_MAX = 64  # images shown in DIR/grid.png (the first ones), whatever N is
RUN_FILE = ".dalle_gen-run.json"  # written at the start, removed with meta.json's arrival: a run that can resume
SAME_RUN_KEYS = ("top_k", "filter_thres", "temperature", "cond_scale", "seed", "top_k_resolved", "steps",
                 "unmask_order")


def _run_record(text: str, checkpoint: Path, settings: dict, image_format: str) -> dict:
    return {"prompt": text, "checkpoint": str(checkpoint), "format": image_format,
            "settings": {k: settings.get(k) for k in SAME_RUN_KEYS}}


def _previous_run(out: Path) -> dict | None:
    for name in (RUN_FILE, "meta.json"):
        p = out / name
        if p.is_file():
            try:
                meta = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"{p}: unreadable; pass --overwrite to start {out} afresh") from None
            if not isinstance(meta, dict):
                raise UserError(f"{p}: not a dalle_gen.py record; pass --overwrite to start {out} afresh")
            settings = meta.get("settings") or {}
            return {"prompt": meta.get("prompt"), "checkpoint": meta.get("checkpoint"),
                    "format": meta.get("format", "png"), "settings": {k: settings.get(k) for k in SAME_RUN_KEYS}}
    return None


def check_output_dir(out_dir: str | os.PathLike, text: str, checkpoint: Path, settings: dict, image_format: str,
                     overwrite: bool) -> Path:
    """The output directory, checked before any work: writable, and holding no other run's images unless
    ``overwrite`` (a run with the same prompt, checkpoint and sampling settings is resumed)."""
    if image_format not in ("png", "jpg"):
        raise UserError(f"--format must be png or jpg, got {image_format!r}")
    out = ensure_writable_dir(out_dir)
    before = _previous_run(out)
    if before is not None and not overwrite and before != _run_record(text, checkpoint, settings, image_format):
        raise UserError(f"{out} holds the images of another run (prompt {before['prompt']!r}, "
                        f"{before['checkpoint']}); pass --overwrite to replace them, or choose another DIR")
    if before is None and not overwrite and numbered_images(out, (".png", ".jpg")):
        raise UserError(f"{out} holds images no dalle_gen.py run claims; pass --overwrite to replace them, or "
                        f"choose another DIR")
    return out


def write_images(bundle: DalleBundle, text: str, n: int, out: Path, settings: dict, *, image_format: str = "png",
                 overwrite: bool = False, progress: bool = False) -> dict:
    """Generate ``DIR/{i}.{png|jpg}`` for i < n batch by batch, each image written (atomically) as it is made, in
    memory that does not grow with n. A rerun of the same run skips the images already there; ``overwrite``
    starts afresh. Images of this run at i >= n are removed. At the end ``DIR/grid.png`` (the first
    :data:`GRID_MAX` images) and ``DIR/meta.json`` (every image's seed) are written, each atomically."""
    if n < 1:
        raise UserError(f"the number of images must be >= 1, got {n}")
    ids, truncated = encode_prompt(bundle, text)
    if overwrite:
        for name in ("meta.json", RUN_FILE, "grid.png"):
            (out / name).unlink(missing_ok=True)
        for path in numbered_images(out, (".png", ".jpg")).values():
            path.unlink()
    write_json(out / RUN_FILE, _run_record(text, bundle.checkpoint, settings, image_format))
    existing = numbered_images(out, (".png", ".jpg"))
    for i, path in existing.items():
        if i >= n or path.suffix != f".{image_format}":
            path.unlink()
    done = sum(1 for i, p in existing.items() if i < n and p.suffix == f".{image_format}")
    todo = (i for i in range(n) if i not in existing or existing[i].suffix != f".{image_format}")  # lazy: any n
    seed = settings.get("seed", 0)
    bar = tqdm(total=n, initial=done, desc="images", unit="img", disable=not progress)
    batches = generate_batches(bundle, ids, todo, seed=seed, batch_size=settings.get("batch_size", 32),
                               top_k=settings.get("top_k"), filter_thres=settings.get("filter_thres"),
                               temperature=settings.get("temperature", 1.0), cond_scale=settings.get("cond_scale", 1.0),
                               steps=settings.get("steps"), unmask_order=settings.get("unmask_order"))
    for chunk, images in batches:
        for i, img in zip(chunk, to_pil(images), strict=True):
            with atomic_path(out / f"{i}.{image_format}") as tmp:
                img.save(tmp, format="PNG" if image_format == "png" else "JPEG", quality=95)
        bar.update(len(chunk))
    bar.close()
    names = [f"{i}.{image_format}" for i in range(n)]
    shown = torch.stack([torch.from_numpy(np.array(Image.open(out / name).convert("RGB"), dtype=np.uint8))
                         .permute(2, 0, 1) for name in names[:GRID_MAX]]).float().div(255)
    save_image_grid(shown, out / "grid.png", nrow=min(8, len(shown)))
    meta = {"prompt": text, "text_ids": ids[0].tolist(), "truncated": truncated, "n": n, "format": image_format,
            "images": names, "seeds": [seed + i for i in range(n)], "reused": done,
            "checkpoint": str(bundle.checkpoint), "kind": bundle.kind, "settings": settings}
    write_json(out / "meta.json", meta)
    (out / RUN_FILE).unlink(missing_ok=True)
    return meta


def settings_dict(bundle: DalleBundle, **kw) -> dict:
    """The sampling settings as meta.json records them (with the resolved top-k, and for a masked model the resolved
    ``steps`` and ``unmask_order``; both None for an autoregressive one, which refuses them)."""
    k = top_k_count(bundle.model.cfg.num_image_tokens, kw.get("top_k"), kw.get("filter_thres"))
    masked = sampler_options(bundle, kw.get("steps"), kw.get("unmask_order"))
    return {**kw, "steps": masked.get("steps"), "unmask_order": masked.get("order"), "top_k_resolved": k,
            "device": str(bundle.device)}

