"""Evaluation of a tokenizer checkpoint on a split: PSNR, SSIM, codebook usage, optional reconstruction grid."""

from __future__ import annotations

import torch
from tqdm import tqdm

from form_data.datasets import collate, default_transform, open_dataset
from form_data.fileio import atomic_path, ensure_writable_dir
from train_runtime.distributed import resolve_device
from train_runtime.trainer import save_image_grid
from vae_train.load import load_image_tokenizer
from vae_train.metrics import RunningStats


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
        from PIL import Image

        out = ensure_writable_dir(recon_dir)
        count = [0]

        def saver(recon: torch.Tensor) -> None:  # the pixels torchvision's save_image writes: round(255 x), clamped
            arrs = recon.float().clamp(0, 1).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            for arr in arrs.cpu().numpy():
                with atomic_path(out / f"{count[0]}.png") as tmp:
                    Image.fromarray(arr).save(tmp, format="png")
                count[0] += 1

    metrics, first = reconstruction_metrics(model, batches, saver)
    if grid and first is not None:
        save_image_grid(first, grid, nrow=min(8, len(first) // 2))
    return {"images": n, **metrics}
