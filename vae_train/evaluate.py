"""Evaluation of a tokenizer checkpoint on a split: PSNR, SSIM, codebook usage, optional reconstruction grid.

Broken images are left out, never replaced by a neighbour: the metrics cover the readable rows only, and the result
counts the others (``skipped``, with the first few paths in ``skipped_paths``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset
from tqdm import tqdm

from form_data.datasets import StrictRows, collate, collate_rows, default_transform, open_dataset
from vae_train.load import load_image_tokenizer
from vae_train.metrics import RunningStats
from zh_t2i_base.cli import UserError, user_errors
from zh_t2i_base.device import resolve_device
from zh_t2i_base.fileio import ensure_writable_dir
from zh_t2i_base.images import save_image_grid, save_png, to_pil

SHOWN_SKIPPED = 5  # broken paths named in the result


def image_rows(ds, limit: int, batch_size: int = 64, skipped: list[int] | None = None
               ) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Batches ``(images [B, 3, H, W] on the CPU, their row indices)`` of the readable images among the first
    ``limit`` rows of a data set, each row with its own image: a broken row is left out (not replaced by the next
    readable one) and its index appended to ``skipped``. Rows of a listing are its lines; of webdataset shards, the
    samples in stream order (a broken sample is a row too)."""
    skipped = [] if skipped is None else skipped
    if isinstance(ds, IterableDataset):
        pos, buf = 0, []
        for sample in ds:
            for _ in range(int(sample["skipped"])):
                if pos < limit:
                    skipped.append(pos)
                    pos += 1
            if pos >= limit:
                break
            buf.append((pos, sample))
            pos += 1
            if len(buf) == batch_size:
                yield collate([s for _, s in buf])["image"], [i for i, _ in buf]
                buf = []
        if buf:
            yield collate([s for _, s in buf])["image"], [i for i, _ in buf]
        return
    rows = StrictRows(ds)
    n = min(len(ds), limit)
    for start in range(0, n, batch_size):
        items = [rows[i] for i in range(start, min(n, start + batch_size))]
        batch, broken = collate_rows(items)
        skipped.extend(broken)
        if batch is not None:
            yield batch["image"], [i for i, s in items if s is not None]


def image_batches(ds, limit: int, device: torch.device, batch_size: int = 64, skipped: list[int] | None = None):
    """The readable images among the first ``limit`` rows of a data set, collated into batches on ``device``
    (broken rows left out, their indices appended to ``skipped``; see :func:`image_rows`)."""
    for images, _ in image_rows(ds, limit, batch_size, skipped):
        yield images.to(device)


def reconstruction_metrics(model, batches, on_recon=None) -> tuple[dict, torch.Tensor | None]:
    """PSNR / SSIM / codebook usage of ``model``'s encode -> decode round trip over image batches, and a grid tensor
    (first 8 originals over their reconstructions). ``on_recon(recon)`` sees every batch of reconstructions."""
    stats = RunningStats(model.num_tokens)
    first = None
    with torch.no_grad():
        for images in batches:
            with user_errors(ValueError):  # e.g. a Styled-VQ without its codebook yet
                idx = model.encode(images)
            recon = model.decode(idx)
            stats.update(images, recon, idx)
            if on_recon is not None:
                on_recon(recon)
            if first is None:
                first = torch.cat([images[:8], recon[:8]])
    return (stats.result() if stats.counts else {}), first


def evaluate(tokenizer: str, data: str, max_images: int = 1000, grid: str | None = None, device: str = "auto",
             yaml_path: str | None = None, batch_size: int = 64, recon_dir: str | None = None) -> dict:
    """Metrics of a checkpoint on the readable images among the first ``max_images`` rows of a split; optionally a
    grid PNG and each readable row's reconstruction as ``recon_dir/{i}.png`` (i = row in the split). Broken rows are
    counted (``skipped``) and named (``skipped_paths``, the first few), and reported in one line on stderr."""
    dev = resolve_device(device)
    model = load_image_tokenizer(tokenizer, yaml_path=yaml_path, device=dev)
    ds = open_dataset(data, transform=default_transform(model.image_size), image_size=model.image_size)
    listed = not isinstance(ds, IterableDataset)
    n = min(len(ds), max_images) if listed else max_images
    out = ensure_writable_dir(recon_dir) if recon_dir else None
    skipped: list[int] = []
    current: list[int] = []  # the rows of the batch being reconstructed
    done = [0]

    def batches():
        for images, rows in image_rows(ds, n, batch_size, skipped):
            current[:] = rows
            done[0] += len(rows)
            yield images.to(dev)

    def saver(recon: torch.Tensor) -> None:
        for i, img in zip(current, to_pil(recon), strict=True):
            save_png(img, out / f"{i}.png")

    progress = tqdm(batches(), total=-(-n // batch_size) if listed else None, desc="eval", unit="batch",
                    leave=False)
    metrics, first = reconstruction_metrics(model, progress, saver if out is not None else None)
    if listed:
        paths = [ds.image_path(i) for i in skipped[:SHOWN_SKIPPED]] if hasattr(ds, "image_path") else []
    else:
        paths = sorted(getattr(ds, "broken", ()))[:SHOWN_SKIPPED]
    if first is None:
        raise UserError(f"{data}: no readable image among its first {len(skipped)} rows (e.g. {paths[0]})" if paths
                        else f"{data}: no readable image")
    images = done[0]
    if skipped:
        print(f"eval: skipped {len(skipped)} unreadable image(s), left out of the metrics, which cover the other "
              f"{images}; first: {', '.join(paths)}", file=sys.stderr)
    if grid:
        save_image_grid(first, grid, nrow=min(8, len(first) // 2))
    return {"images": images, "skipped": len(skipped), "skipped_paths": paths, **metrics}
