"""Retrieval evaluation: image->text and text->image recall, mean recall, ranks, val loss, attribute-level recall,
zero-shot classification. Used by training (every eval) and by ``python -m clip_train eval``.

Conventions (all recalls in %):

* strict: image ``i`` and caption ``i`` are each other's only positive (open_clip's ``get_clip_metrics``:
  duplicates count as negatives);
* attribute-level (when attributes are given): a retrieved item counts as correct when the caption's stated
  attributes all hold for the image (see :func:`attribute_matches`); a query is a hit at K when any correct item is
  in its top K (the multi-positive convention of Chinese-CLIP's evaluation);
* ``*_mean_recall``, ``*_median_rank``, ``*_mean_rank`` and how ties rank: :mod:`zh_t2i_base.retrieval`;
* a row whose image is broken is left out of both sides (its image and its caption), never replaced by the next
  readable image; ``skipped`` counts such rows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from clip_train.model import normalize
from form_data.datasets import StrictRows, collate, collate_rows, default_transform, open_dataset
from form_data.synth import parse_caption
from form_data.tokenizer import ChineseTokenizer
from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import read_jsonl, write_json
from zh_t2i_base.retrieval import KS, ranks, recall_metrics

SYNTH_KEYS = ("colour", "shape", "size", "background")
SHOWN_SKIPPED = 5  # broken paths named in the eval command's result


def separator(text: str) -> str:
    """A CSV separator flag: one character; ``\\t`` and ``tab`` mean a tab."""
    sep = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(sep) != 1:
        raise UserError(f"--csv-separator must be one character, got {text!r}")
    return sep


def open_pairs(path: str, image_size: int, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t",
               random_crop: bool = False) -> Dataset:
    """An image-caption split in any form_data format; the CSV options apply to .csv/.tsv files."""
    kw = {}
    if Path(path).suffix.lower() in (".csv", ".tsv") and not Path(path).is_dir():  # a folder named x.csv: images
        kw = {"img_key": img_key, "caption_key": caption_key, "sep": separator(sep)}
    return open_dataset(path, transform=default_transform(image_size, random_crop=random_crop),
                        image_size=image_size, **kw)


def _direction(prefix: str, rank: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in recall_metrics(rank, KS).items()}


def attribute_matches(image_attrs: Sequence[Mapping], text_attrs: Sequence[Mapping]) -> torch.Tensor:
    """Bool [N_images, N_texts]: caption ``j`` is a correct description of image ``i``.

    Every attribute caption ``j`` states (a value that is not None) must equal image ``i``'s value of that attribute;
    attributes the caption leaves out (None) do not matter.
    """
    keys = sorted({k for row in text_attrs for k, v in row.items() if v is not None})
    match = torch.ones(len(image_attrs), len(text_attrs), dtype=torch.bool)
    for key in keys:
        codes: dict[object, int] = {}
        img = torch.tensor([codes.setdefault(row.get(key), len(codes)) for row in image_attrs])
        txt = torch.tensor([-1 if row.get(key) is None else codes.setdefault(row[key], len(codes))
                            for row in text_attrs])
        match &= (txt[None, :] == -1) | (img[:, None] == txt[None, :])
    return match


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      image_attrs: Sequence[Mapping] | None = None,
                      text_attrs: Sequence[Mapping] | None = None) -> dict[str, float]:
    """Strict (and, with attributes, attribute-level) recall in both directions for paired features [N, D].

    ``image_attrs[i]``: the true attributes of image ``i``; ``text_attrs[j]``: the attributes caption ``j`` states
    (None = not stated). Either defaults to the other, e.g. ``text_attrs=[parse_caption(c) for c in captions]``
    alone describes every image by its own caption.
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"{image_features.shape[0]} images but {text_features.shape[0]} captions")
    img = F.normalize(image_features.float(), dim=-1).cpu().numpy()
    txt = F.normalize(text_features.float(), dim=-1).cpu().numpy()
    n = len(img)
    out = {**_direction("i2t", ranks(img, txt)), **_direction("t2i", ranks(txt, img))}
    if image_attrs is not None or text_attrs is not None:
        image_attrs = image_attrs if image_attrs is not None else text_attrs
        text_attrs = text_attrs if text_attrs is not None else image_attrs
        if len(image_attrs) != n or len(text_attrs) != n:
            raise ValueError(f"attributes for {len(image_attrs)} images / {len(text_attrs)} captions, features for {n}")
        match = attribute_matches(image_attrs, text_attrs).numpy()
        out.update(_direction("i2t_attr", ranks(img, txt, match)))
        out.update(_direction("t2i_attr", ranks(txt, img, match.T)))
    return out


def synthetic_attributes(image_paths: Sequence[str], captions: Sequence[str],
                         attributes_file: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """``(image_attrs, text_attrs)`` for a synthetic split: the true attributes from ``attributes.jsonl``
    (``form_data synth``), joined on the image path, and the attributes each caption states (``parse_caption``)."""
    root = Path(attributes_file).resolve().parent
    truth = {os.path.normpath(root / row["filepath"]): row for row in read_jsonl(attributes_file)
             if isinstance(row, dict) and "filepath" in row}
    image_attrs = []
    for path in image_paths:
        row = truth.get(os.path.normpath(Path(path).resolve()))
        if row is None:
            raise UserError(f"{attributes_file}: no attributes for {path} (is it the attributes.jsonl of this split?)")
        image_attrs.append({k: row.get(k) for k in SYNTH_KEYS})
    return image_attrs, [parse_caption(c) for c in captions]


def read_labels(path: str | os.PathLike) -> list[str]:
    """A zero-shot label list: one Chinese label per line (blank lines and ``#`` comments ignored)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"label file not found: {p}")
    try:
        labels = [s.strip() for s in p.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    labels = list(dict.fromkeys(s for s in labels if s and not s.startswith("#")))
    if len(labels) < 2:
        raise UserError(f"{p}: a zero-shot label list needs at least 2 labels, found {len(labels)}")
    return labels


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: ChineseTokenizer, texts: Sequence[str], context_length: int,
                 device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features [N, D] (float32)."""
    feats = [model.encode_text(tokenizer.encode(list(texts[i:i + batch_size]), context_length).to(device),
                               normalize=True).float() for i in range(0, len(texts), batch_size)]
    return torch.cat(feats) if feats else torch.empty(0)


def zero_shot(model: nn.Module, tokenizer: ChineseTokenizer, context_length: int, image_features: torch.Tensor,
              captions: Sequence[str], labels: Sequence[str], template: str = "{}") -> dict[str, float]:
    """Top-1 accuracy (%) of classifying each image among ``labels`` (prompts ``template.format(label)``); an image's
    true label is the longest label its caption contains; images whose caption holds none are left out."""
    by_length = sorted(labels, key=len, reverse=True)
    truth = [next((labels.index(lab) for lab in by_length if lab in c), -1) for c in captions]
    keep = torch.tensor([t >= 0 for t in truth])
    if not keep.any():
        return {"zeroshot_n": 0.0}
    device = next(model.parameters()).device
    label_features = encode_texts(model, tokenizer, [template.format(lab) for lab in labels], context_length, device)
    pred = (image_features.to(device).float() @ label_features.T).argmax(dim=1).cpu()
    target = torch.tensor(truth)
    return {"zeroshot_top1": float((pred[keep] == target[keep]).double().mean() * 100), "zeroshot_n": float(keep.sum())}


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: ChineseTokenizer, context_length: int, dataset: Dataset,
             device: torch.device, batch_size: int = 256, workers: int = 0, attributes_file: str = "",
             labels: Sequence[str] = (), template: str = "{}", broken: list[int] | None = None) -> dict[str, float]:
    """Encode every readable pair of ``dataset`` and return val loss, retrieval metrics (+ attribute-level with
    ``attributes_file``, + zero-shot with ``labels``) and ``skipped`` (rows left out: their image is broken; their
    indices are appended to ``broken``). The model is used as it is (callers set eval mode)."""
    loss_fn = ClipLoss()
    image_feats, text_feats, captions, paths, losses = [], [], [], [], []
    listed = not isinstance(dataset, IterableDataset)
    loader = DataLoader(StrictRows(dataset) if listed else dataset, batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_rows if listed else _stream_batch)
    rows: list[int] = [] if broken is None else broken
    skipped = 0
    for batch, left_out in loader:
        rows.extend(left_out)
        skipped += len(left_out)
        if batch is None:
            continue
        skipped += int(batch["skipped"])
        images = normalize(model, batch["image"].to(device))
        text = tokenizer.encode(batch["caption"], context_length).to(device)
        fi = model.encode_image(images, normalize=True).float()
        ft = model.encode_text(text, normalize=True).float()
        losses.append(float(loss_fn(fi, ft, model.logit_scale.exp().float())) * len(fi))
        image_feats.append(fi.cpu())
        text_feats.append(ft.cpu())
        captions.extend(batch["caption"])
        if attributes_file:
            paths.extend(dataset.image_path(int(i)) for i in batch["index"])
    if not captions:
        raise UserError(f"no readable image among the {skipped} samples of {dataset!r}")
    image_features, text_features = torch.cat(image_feats), torch.cat(text_feats)
    image_attrs = text_attrs = None
    if attributes_file:
        image_attrs, text_attrs = synthetic_attributes(paths, captions, attributes_file)
    out = {"val_loss": sum(losses) / len(captions), "num_samples": float(len(captions)), "skipped": skipped,
           **retrieval_metrics(image_features, text_features, image_attrs, text_attrs)}
    if labels:
        out.update(zero_shot(model, tokenizer, context_length, image_features, captions, labels, template))
    return out


def _stream_batch(items):
    """Webdataset samples -> (batch, no broken rows): a stream counts its broken samples in ``batch["skipped"]``."""
    return collate(items), []


def evaluate_checkpoint(checkpoint: str, data: str, attributes: str = "", labels_file: str = "", template: str = "{}",
                        img_key: str = "filepath", caption_key: str = "title", sep: str = "\t", batch_size: int = 256,
                        workers: int = 2, device: str = "auto", out: str = "") -> dict[str, float]:
    """:func:`evaluate` for a checkpoint of ``python -m clip_train`` on a split (``python -m clip_train eval``)."""
    from clip_train.load import load_clip
    from zh_t2i_base.device import resolve_device

    if "{}" not in template:
        raise UserError(f"--zeroshot-template must contain {{}} where the label goes, got {template!r}")
    labels = read_labels(labels_file) if labels_file else []
    dev = resolve_device(device)
    clip = load_clip(checkpoint, dev)
    dataset = open_pairs(data, clip.image_size, img_key, caption_key, sep)
    broken: list[int] = []
    metrics = evaluate(clip.model, clip.tokenizer, clip.context_length, dataset, dev, batch_size, workers, attributes,
                       labels, template, broken)
    if hasattr(dataset, "image_path"):
        shown = [dataset.image_path(i) for i in broken[:SHOWN_SKIPPED]]
    else:
        shown = sorted(getattr(dataset, "broken", ()))[:SHOWN_SKIPPED]
    metrics["skipped_paths"] = shown
    if metrics["skipped"]:
        print(f"eval: skipped {metrics['skipped']} unreadable image(s), left out with their captions; the metrics "
              f"cover the other {int(metrics['num_samples'])} pairs; first: {', '.join(shown)}", file=sys.stderr)
    if out:
        write_json(out, metrics)
    return metrics
