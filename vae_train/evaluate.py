"""Evaluation of a tokenizer checkpoint on a split: PSNR, SSIM, codebook usage, optional reconstruction grid."""

from __future__ import annotations

import torch
from tqdm import tqdm

from form_data.datasets import collate, default_transform, open_dataset
from vae_train.load import load_image_tokenizer
from vae_train.metrics import RunningStats
from zh_t2i_base.cli import user_errors
from zh_t2i_base.device import resolve_device
from zh_t2i_base.fileio import ensure_writable_dir
from zh_t2i_base.images import save_image_grid, save_png, to_pil


def image_batches(ds, limit: int, device: torch.device, batch_size: int = 64):
    """The first ``limit`` images of a listed data set, collated into batches on ``device``."""
    n = min(len(ds), limit)
    for start in range(0, n, batch_size):
        yield collate([ds[i] for i in range(start, min(n, start + batch_size))])["image"].to(device)


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
    """Metrics of a checkpoint on the first ``max_images`` of a split; optionally a grid PNG and every
    reconstruction as ``recon_dir/{i}.png`` (i = position in the split)."""
    dev = resolve_device(device)
    model = load_image_tokenizer(tokenizer, yaml_path=yaml_path, device=dev)
    ds = open_dataset(data, transform=default_transform(model.image_size), image_size=model.image_size)
    n = min(len(ds), max_images)
    batches = tqdm(image_batches(ds, n, dev, batch_size), total=-(-n // batch_size), desc="eval", unit="batch")
    saver = None
    if recon_dir:
        out = ensure_writable_dir(recon_dir)
        count = [0]

        def saver(recon: torch.Tensor) -> None:
            for img in to_pil(recon):
                save_png(img, out / f"{count[0]}.png")
                count[0] += 1

    metrics, first = reconstruction_metrics(model, batches, saver)
    if grid and first is not None:
        save_image_grid(first, grid, nrow=min(8, len(first) // 2))
    return {"images": n, **metrics}
