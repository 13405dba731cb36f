"""Token-order analysis: how much does the reconstruction error rise when one token position is replaced?

For every position t the continuous tokens of a set of images are decoded with token t replaced either by its mean
over the images ("mean") or by token t of another image of the set ("swap", a fixed derangement). The rise of the
pixel MSE (in [0, 1] space) over the unmodified reconstruction says how much the image depends on that position.
The seed claims a coarse-to-fine order (early tokens = high-level attributes), which would show as large rises for
early positions falling towards late ones: the Spearman correlation between position and rise is then negative.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from form_data.datasets import collate, default_transform
from styled_vq.data import open_images
from vae_train.styled import StyledVQ
from zh_t2i_base.fileio import atomic_path, ensure_writable_dir, write_json


def _mse(model: StyledVQ, z: Tensor, images: Tensor, batch_size: int) -> Tensor:
    """Per-image MSE of the decoded tokens against the images."""
    out = []
    for s in range(0, z.shape[0], batch_size):
        recon = model.decode_continuous(z[s:s + batch_size])
        out.append((recon - images[s:s + batch_size]).pow(2).mean((1, 2, 3)))
    return torch.cat(out)


def _spearman(values: list[float]) -> float:
    """Rank correlation between position (0, 1, ...) and ``values`` (ties get arbitrary ranks)."""
    v = torch.tensor(values, dtype=torch.float64)
    ranks = torch.argsort(torch.argsort(v)).double()
    pos = torch.arange(len(values), dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([pos, ranks]))[0, 1]) if len(values) > 1 else 0.0


def token_order(model: StyledVQ, images: Tensor, batch_size: int = 64, seed: int = 0) -> dict:
    """Rise of the MSE per replaced token position, for both replacement modes, and summaries."""
    n, t = images.shape[0], model.seq_len
    if n < 2:
        raise ValueError("the analysis needs at least 2 images")
    g = torch.Generator().manual_seed(seed)
    other = (torch.arange(n) + 1 + torch.randint(0, n - 1, (1,), generator=g)) % n  # a derangement: never itself
    model.eval()
    with torch.no_grad():
        z = torch.cat([model.encode_continuous(images[s:s + batch_size]) for s in range(0, n, batch_size)])
        base = _mse(model, z, images, batch_size)
        mean_tok = z.mean(0)
        rise: dict[str, list[float]] = {"mean": [], "swap": []}
        for pos in range(t):
            for mode, values in rise.items():
                zz = z.clone()
                zz[:, pos] = mean_tok[pos] if mode == "mean" else z[other, pos]
                values.append(float((_mse(model, zz, images, batch_size) - base).mean()))
    k = model.cfg.tokens_per_block
    half = t // 2
    summary = {}
    for mode, values in rise.items():
        total = sum(values)
        summary[mode] = {
            "spearman_position_vs_rise": _spearman(values),
            "first_half_share": sum(values[:half]) / total if total > 0 else 0.0,
            "per_block": [sum(values[b * k:(b + 1) * k]) / k for b in range(t // k)],
            "per_slot_in_block": [sum(values[j::k]) / len(values[j::k]) for j in range(k)],
            "argmax_position": int(torch.tensor(values).argmax()),
        }
    return {"images": n, "seq_len": t, "tokens_per_block": k, "base_mse": float(base.mean()),
            "token_variance": z.var(0).sum(-1).tolist(), "mse_rise": rise, "summary": summary}


def plot(result: dict, path: str | os.PathLike) -> Path:
    """Bar chart of the MSE rise per position (both modes), with the decoder's condition blocks shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, k = result["seq_len"], result["tokens_per_block"]
    fig, ax = plt.subplots(figsize=(max(6.0, t * 0.25), 3.5))
    for b in range(0, t // k, 2):
        ax.axvspan(b * k - 0.5, (b + 1) * k - 0.5, color="0.92", lw=0)
    x = torch.arange(t)
    for offset, (mode, label) in zip((-0.2, 0.2), (("mean", "replaced by its mean"),
                                                   ("swap", "replaced by another image's")), strict=True):
        ax.bar((x + offset).tolist(), result["mse_rise"][mode], width=0.4, label=label)
    ax.set_xlabel(f"token position (shaded pairs: decoder condition blocks of {k})")
    ax.set_ylabel("MSE rise over the reconstruction")
    ax.set_title(f"Styled-VQ token order ({result['images']} images; Spearman position vs rise: mean "
                 f"{result['summary']['mean']['spearman_position_vs_rise']:.2f}, swap "
                 f"{result['summary']['swap']['spearman_position_vs_rise']:.2f})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def analyze(model_path: str, data: str, out_dir: str, max_images: int = 256, batch_size: int = 64, seed: int = 0,
            device: str = "auto") -> dict:
    """Run :func:`token_order` on the first ``max_images`` images of ``data``; write token_order.json and .png."""
    from styled_vq.train import load_model
    from zh_t2i_base.device import resolve_device

    out = ensure_writable_dir(out_dir)
    dev = resolve_device(device)
    model = load_model(model_path, device=dev)
    ds = open_images(data, transform=default_transform(model.image_size), image_size=model.image_size)
    n = min(len(ds), max_images)
    images = collate([ds[i] for i in range(n)])["image"].to(dev)
    result = {"tokenizer": str(model_path), "data": str(data), **token_order(model, images, batch_size, seed)}
    write_json(out / "token_order.json", result)
    plot(result, out / "token_order.png")
    return {"out": str(out), "base_mse": result["base_mse"], "summary": result["summary"]}
