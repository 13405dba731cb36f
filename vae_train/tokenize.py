"""Pre-tokenization: encode a data set once into token files, so DALLE training needs no VAE forward per step.

Output (one ``torch.save`` file, loadable with ``weights_only=True``)::

    {"tokens": IntTensor[N, seq_len], "captions": [str] * N, "images": [relative image path or index] * N,
     "hflip": [bool] * N (the sample is the mirrored image; ``--hflip``),
     "tokenizer": {"path": str, "yaml": str, "kind": str, "num_tokens": int, "seq_len": int, "fmap_size": int,
                   "image_size": int}, "data": str}

Images are resized and centre-cropped deterministically; broken images are skipped (and counted), never fatal.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from form_data.datasets import collate, default_transform, open_dataset
from vae_train.load import load_image_tokenizer
from zh_t2i_base.cli import UserError, user_errors
from zh_t2i_base.device import resolve_device
from zh_t2i_base.fileio import atomic_path, ensure_writable_dir


class _Strict(Dataset):
    """A data set whose broken images are reported as such (not replaced by a neighbour): each image once."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        return None if item["index"] != i else item


def _collate(items):
    good = [x for x in items if x is not None]
    return (collate(good) if good else None), len(items) - len(good)


def tokenize(tokenizer: str, data: str, out: str | os.PathLike, batch_size: int = 64, workers: int = 2,
             device: str = "cpu", yaml_path: str | None = None, progress: bool = True, hflip: bool = False) -> dict:
    """Encode every readable image of ``data``; ``hflip``: also its mirror image, as an extra sample with the same
    caption (augmentation for captions that never say left or right)."""
    dev = resolve_device(device)
    model = load_image_tokenizer(tokenizer, yaml_path=yaml_path, device=dev)
    ds = open_dataset(data, transform=default_transform(model.image_size), image_size=model.image_size)
    if not hasattr(ds, "__getitem__"):
        raise UserError(f"{data}: tokenize needs a listed data set (CSV/JSONL/folder), not webdataset shards")
    out = Path(out)
    ensure_writable_dir(out.parent if out.parent != Path("") else Path("."))
    loader = DataLoader(_Strict(ds), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    tokens, captions, images, flipped, skipped = [], [], [], [], 0
    with torch.no_grad():
        for batch, broken in tqdm(loader, desc="tokenize", unit="batch", disable=not progress):
            skipped += broken
            if batch is None:
                continue
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
