"""Pre-tokenization: encode a data set once into token files, so DALLE training needs no VAE forward per step.

Output (one ``torch.save`` file, loadable with ``weights_only=True``)::

    {"tokens": IntTensor[N, seq_len], "captions": [str] * N, "images": [relative image path or index] * N,
     "hflip": [bool] * N (the sample is the mirrored image; ``--hflip``),
     "tokenizer": {"path": str, "yaml": str, "kind": str, "num_tokens": int, "seq_len": int, "fmap_size": int,
                   "image_size": int}, "data": str}

Images are resized and centre-cropped deterministically; broken images are skipped (and counted), never fatal, unless
no image at all can be read. ``--data`` may be a listing (CSV / JSONL / image folder) or webdataset shards (``images``
then holds the sample keys' numbers).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from form_data.datasets import StrictRows, collate, collate_rows, default_transform, open_dataset
from vae_train.load import load_image_tokenizer
from zh_t2i_base.cli import UserError, user_errors
from zh_t2i_base.device import resolve_device
from zh_t2i_base.fileio import atomic_path, ensure_writable_dir


def _collate_stream(items):
    """Webdataset samples -> (batch, no broken rows): a stream counts its broken samples in ``batch["skipped"]``."""
    return collate(items), []


def tokenize(tokenizer: str, data: str, out: str | os.PathLike, batch_size: int = 64, workers: int = 2,
             device: str = "cpu", yaml_path: str | None = None, progress: bool = True, hflip: bool = False) -> dict:
    """Encode every readable image of ``data``; ``hflip``: also its mirror image, as an extra sample with the same
    caption (augmentation for captions that never say left or right)."""
    dev = resolve_device(device)
    model = load_image_tokenizer(tokenizer, yaml_path=yaml_path, device=dev)
    ds = open_dataset(data, transform=default_transform(model.image_size), image_size=model.image_size)
    listed = not isinstance(ds, IterableDataset)
    out = Path(out)
    ensure_writable_dir(out.parent if out.parent != Path("") else Path("."))
    # each listed image once (a broken row is counted, not replaced by its neighbour); shards: every sample once
    loader = DataLoader(StrictRows(ds) if listed else ds, batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_rows if listed else _collate_stream)
    tokens, captions, images, flipped, skipped = [], [], [], [], 0
    with torch.no_grad():
        for batch, broken in tqdm(loader, total=len(loader) if listed else None, desc="tokenize", unit="batch",
                                  disable=not progress):
            skipped += len(broken)
            if batch is None:
                continue
            skipped += int(batch["skipped"])
            for flip in (False, True) if hflip else (False,):
                pixels = batch["image"].flip(-1) if flip else batch["image"]
                with user_errors(ValueError):  # e.g. a Styled-VQ without its codebook yet
                    tokens.append(model.encode(pixels.to(dev)).to(torch.int32).cpu())
                captions.extend(batch["caption"])
                images.extend(int(i) for i in batch["index"])
                flipped.extend([flip] * len(batch["caption"]))
    if not tokens:
        raise UserError(f"{data}: no readable image")
    result = {
        "tokens": torch.cat(tokens), "captions": captions,
        "images": [str(ds.image_path(i)) if hasattr(ds, "image_path") else str(i) for i in images],
        "hflip": flipped,
        "tokenizer": {"path": str(Path(tokenizer).resolve()),
                      "yaml": str(Path(yaml_path).resolve()) if yaml_path else "",
                      "kind": type(model).__name__,
                      "num_tokens": int(model.num_tokens), "seq_len": int(model.seq_len),
                      "fmap_size": int(getattr(model, "fmap_size", 0) or 0), "image_size": int(model.image_size)},
        "data": str(data), "skipped": skipped,
    }
    with atomic_path(out) as tmp:
        torch.save(result, tmp)
    return {"samples": len(captions), "skipped": skipped, "seq_len": int(model.seq_len), "out": str(out)}
