"""Two-stage Styled-VQ training on the shared runtime, the feature dump and the codebook steps.

Stage 1 (``--stage 1``): continuous tokens, loss = MSE + ``perceptual_weight`` x LPIPS (VGG weights from local files
only). Then ``dump`` (stage-1 tokens of a data set, eval mode, centre crop, one shard per rank), ``kmeans`` (the
codebook, distributed under torchrun) and ``attach`` (a stage-2 model = stage-1 weights + codebook). Stage 2
(``--stage 2``): optional fine-tuning through the frozen codebook with the straight-through estimator.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from form_data.datasets import collate, default_transform
from styled_vq.data import open_images
from styled_vq.kmeans import kmeans, load_centres, load_shards
from train_runtime import RuntimeConfig, Task, Trainer
from train_runtime import checkpoint as ckpt
from train_runtime import distributed as distrib
from train_runtime.config import path_field, to_dict
from vae_train.styled import StyledVQ, StyledVQConfig
from zh_t2i_base.cli import PathArg, UserError, user_errors
from zh_t2i_base.fileio import atomic_path, ensure_writable_dir, read_structured, require_keys, write_json
from zh_t2i_base.images import save_image_grid


@dataclass
class SVQTrainConfig:
    stage: int = 1  # 1: continuous tokens; 2: fine-tune through the frozen codebook (straight-through)
    preset: str = ""  # named model sizes (full, tiny36, tiny36-64px, micro8, small) as defaults for the model flags
    # CSV / JSONL / image folder (form_data formats) or the original's JSON list of paths
    train_data: str = path_field(PathArg("in", content="images", urls=True))
    # held-out images for MSE / PSNR (and codebook usage in stage 2)
    val_data: str = path_field(PathArg("in", content="images"))
    # our run dir / ckpt-*.pt / model.safetensors to start from (required in stage 2)
    init_from: str = path_field(PathArg("in", content="checkpoint"))
    # stage 2: k-means centres (`python -m styled_vq kmeans`), unless init_from has a codebook
    codebook: str = path_field(PathArg("in", "file", "checkpoint"))
    random_crop: bool = False  # RandomResizedCrop(scale 0.75-1); else resize + centre crop
    perceptual_weight: float = 1.0  # LPIPS weight; on only when --lpips-vgg (and --lpips-lin) are given
    # local torchvision vgg16 state dict (or a taming checkpoint holding LPIPS)
    lpips_vgg: str = path_field(PathArg("in", "file", "checkpoint"))
    lpips_lin: str = path_field(PathArg("in", "file", "checkpoint"))  # local LPIPS vgg.pth (lin layers)
    grad_checkpointing: bool = False  # activation checkpointing of every transformer block
    eval_images: int = 256  # val images for the metrics


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> StyledVQ:
    """A Styled-VQ model of ours (run dir, ckpt-*.pt or model.safetensors), in eval mode."""
    from vae_train.load import load_image_tokenizer

    model = load_image_tokenizer(path, device=device)
    if not isinstance(model, StyledVQ):
        raise UserError(f"{path}: not a Styled-VQ model (a {type(model).__name__})")
    return model


def export(model: StyledVQ, out_dir: str | os.PathLike, step: int = 0) -> Path:
    """``out_dir/model.safetensors`` with the model's meta: loadable by ``load_image_tokenizer(out_dir)``."""
    out = ensure_writable_dir(out_dir) / "model.safetensors"
    return ckpt.export_safetensors(model.state_dict(), out, {"step": step, "meta": json.dumps(model.checkpoint_meta())})


def _perceptual(tc: SVQTrainConfig) -> nn.Module | None:
    if tc.perceptual_weight <= 0 or not (tc.lpips_vgg or tc.lpips_lin):
        return None
    from vae_train.lpips import LPIPS

    try:
        return LPIPS(tc.lpips_vgg or None, tc.lpips_lin or None)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"LPIPS: {e}") from None


class StyledVQTask(Task):
    def __init__(self, tc: SVQTrainConfig, model: StyledVQ, val_set: Dataset | None, perceptual: nn.Module | None):
        self.tc, self.model, self.val_set, self.perceptual = tc, model, val_set, perceptual
        self._fixed: torch.Tensor | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def training_step(self, batch, step):
        images = batch["image"]
        recon, _, _ = self.ddp["model"](images, quantize=self.tc.stage == 2)
        target = images * 2 - 1
        mse = F.mse_loss(recon.float(), target)
        loss, extra = mse, {"mse": float(mse.detach())}
        if self.perceptual is not None:
            self.perceptual.to(images.device)
            p = self.perceptual(recon.float(), target).mean()
            loss = loss + self.tc.perceptual_weight * p
            extra["lpips"] = float(p.detach())
        return {"model": loss}, extra

    def _val_batches(self, limit: int, batch_size: int = 32):
        n = min(len(self.val_set), limit)
        for s in range(0, n, batch_size):
            yield collate([self.val_set[i] for i in range(s, min(n, s + batch_size))])["image"].to(self.env.device)

    def evaluate(self, step: int) -> dict[str, float]:
        if self.val_set is None:
            return {}
        quantize = self.tc.stage == 2
        se, n, used = 0.0, 0, set()
        for images in self._val_batches(self.tc.eval_images):
            recon, _, idx = self.model(images, quantize=quantize)
            se += float(((recon.float() + 1) / 2).clamp(0, 1).sub(images).pow(2).mean((1, 2, 3)).sum())
            n += images.shape[0]
            if idx is not None:
                used.update(idx.flatten().tolist())
        mse = se / max(n, 1)
        out = {"mse": mse, "psnr": 10 * math.log10(1 / max(mse, 1e-12))}
        if quantize:
            out["codebook_used"] = len(used)
        return out

    def sample(self, step: int, run_dir: Path) -> None:
        if self.val_set is None:
            return
        if self._fixed is None:
            self._fixed = next(self._val_batches(8))
        recon, _, _ = self.model(self._fixed, quantize=self.tc.stage == 2)
        grid = torch.cat([self._fixed, ((recon + 1) / 2).clamp(0, 1)])
        save_image_grid(grid, run_dir / f"recon_{step:08d}.png", nrow=len(self._fixed))
        save_image_grid(grid, run_dir / "recon_latest.png", nrow=len(self._fixed))

    def meta(self) -> dict:
        return self.model.checkpoint_meta()


def build_model(mc: StyledVQConfig, tc: SVQTrainConfig) -> StyledVQ:
    """Stage 1: a new model from ``mc`` (or ``init_from``); stage 2: ``init_from`` + a codebook."""
    if tc.stage not in (1, 2):
        raise UserError(f"--stage must be 1 or 2, got {tc.stage}")
    if tc.stage == 2 and not tc.init_from:
        raise UserError("--stage 2 needs --init-from (a stage-1 run) and a codebook (--codebook, or an attached one)")
    if not tc.init_from:
        return StyledVQ(mc)
    model = load_model(tc.init_from)
    model.cfg = replace(model.cfg, noise=mc.noise)  # the only model option that is a training choice
    if tc.codebook:
        with user_errors(ValueError):
            model.set_codebook(load_centres(tc.codebook))
    if tc.stage == 2 and not model.has_codebook:
        raise UserError(f"--stage 2: {tc.init_from} has no codebook; pass --codebook (from `python -m styled_vq "
                        f"kmeans`)")
    return model


def train(mc: StyledVQConfig, tc: SVQTrainConfig, rc: RuntimeConfig) -> dict:
    if not tc.train_data:
        raise UserError("--train-data is required (CSV / JSONL / image folder, or a JSON list of image paths)")
    if rc.fsdp and rc.fsdp_param_dtype == "bf16":
        raise UserError("--fsdp-param-dtype bf16: Styled-VQ's bottleneck computes in fp32 (use the default fp32; "
                        "--precision bf16 still runs the blocks in bf16)")
    torch.manual_seed(rc.seed)
    model = build_model(mc, tc)
    model.set_grad_checkpointing(tc.grad_checkpointing)
    model.train()
    size = model.image_size
    train_set = open_images(tc.train_data, transform=default_transform(size, random_crop=tc.random_crop),
                            image_size=size)
    val_set = open_images(tc.val_data, transform=default_transform(size), image_size=size) if tc.val_data else None
    task = StyledVQTask(tc, model, val_set, _perceptual(tc))
    config = {"runtime": to_dict(rc), "model": model.cfg.to_dict(), "train": to_dict(tc)}
    return Trainer(rc, task, train_set, collate_fn=collate, config=config).fit()


# ---------------------------------------------------------------------------------------------------------------------
# stage 1 -> codebook


class _Exactly(Dataset):
    """The listed items of a data set, each once: a broken image gives None (not its neighbour)."""

    def __init__(self, ds: Dataset, indices: list[int]):
        self.ds, self.indices = ds, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item = self.ds[self.indices[i]]
        return item if item["index"] == self.indices[i] else None


def _collate_present(items):
    good = [x for x in items if x is not None]
    return (collate(good) if good else None), len(items) - len(good)


def dump(model_path: str, data: str, out_dir: str, batch_size: int = 64, workers: int = 2,
         device: str = "auto") -> dict:
    """Continuous stage-1 tokens of every image of ``data`` (eval mode, no grad, resize + centre crop), one shard
    ``features-RRRRR-of-WWWWW.pt`` per rank ({"features": [N_r, T, E], "index": [N_r]}) and ``meta.json``."""
    env = distrib.setup(device)
    try:
        out = Path(out_dir)
        if env.is_main:
            ensure_writable_dir(out)
        distrib.barrier()
        model = load_model(model_path, device=env.device)
        ds = open_images(data, transform=default_transform(model.image_size), image_size=model.image_size)
        mine = list(range(env.rank, len(ds), env.world_size))
        loader = DataLoader(_Exactly(ds, mine), batch_size=batch_size, num_workers=workers,
                            collate_fn=_collate_present)
        feats, index, skipped = [], [], 0
        with torch.no_grad():
            for batch, broken in tqdm(loader, desc="dump", unit="batch", disable=not env.is_main):
                skipped += broken
                if batch is not None:
                    feats.append(model.encode_continuous(batch["image"].to(env.device)).float().cpu())
                    index.append(batch["index"])
        features = torch.cat(feats) if feats else torch.zeros(0, model.seq_len, model.cfg.emb_dim)
        name = f"features-{env.rank:05d}-of-{env.world_size:05d}.pt"
        with atomic_path(out / name) as tmp:
            torch.save({"features": features, "index": torch.cat(index) if index else torch.zeros(0, dtype=torch.long)},
                       tmp)
        totals = distrib.mean_over_ranks({"images": float(len(features)), "skipped": float(skipped)}, env.device)
        distrib.barrier()
        summary = {"images": round(totals["images"] * env.world_size), "skipped": round(totals["skipped"] *
                                                                                         env.world_size),
                   "seq_len": model.seq_len, "emb_dim": model.cfg.emb_dim, "world_size": env.world_size,
                   "shards": [f"features-{r:05d}-of-{env.world_size:05d}.pt" for r in range(env.world_size)],
                   "tokenizer": str(model_path), "data": str(data)}
        if env.is_main:
            write_json(out / "meta.json", summary)
        return summary
    finally:
        distrib.cleanup()


def build_codebook(features: str, k: int, out: str, iters: int = 50, tol: float = 1e-4, seed: int = 0,
                   groups: int = 0, device: str = "auto", warm_start: int = 0) -> dict:
    """k-means over the dumped tokens (all positions share one codebook); under torchrun each rank reads a
    contiguous block of the shards. ``warm_start``: first cluster a sample of that many x K vectors (0: off). Rank 0
    writes ``out`` = {"centres": [K, E], "counts", "inertia", "history", ...}."""
    env = distrib.setup(device)
    try:
        meta_path = Path(features) / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{features}: no meta.json; is it the output directory of `python -m styled_vq dump`?")
        meta = read_structured(meta_path, "meta.json of `python -m styled_vq dump`")
        require_keys(meta, ("shards", "emb_dim"), meta_path, "meta.json of `python -m styled_vq dump`")
        if not (isinstance(meta["shards"], list) and all(isinstance(s, str) for s in meta["shards"])
                and isinstance(meta["emb_dim"], int) and not isinstance(meta["emb_dim"], bool)):
            raise UserError(f"{meta_path}: 'shards' must be a list of file names and 'emb_dim' an integer")
        out_path = Path(out)
        if env.is_main:
            ensure_writable_dir(out_path.parent if str(out_path.parent) else ".")
        shards = [Path(features) / name for name in meta["shards"]]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise UserError(f"feature shard(s) missing: {', '.join(missing[:3])}")
        x = load_shards(shards, env.rank, env.world_size, meta["emb_dim"]).to(env.device)
        result = kmeans(x, k, iters=iters, tol=tol, seed=seed, groups=groups, warm_start=warm_start,
                        progress=env.is_main)
        summary = {"k": k, "vectors": int(result.counts.sum()), "iterations": result.iterations,
                   "converged": result.converged, "inertia": result.inertia, "empty": int((result.counts == 0).sum()),
                   "warm_start_iterations": result.warm_start_iterations, "out": str(out_path)}
        if env.is_main:
            with atomic_path(out_path) as tmp:
                torch.save({"centres": result.centres.cpu(), "counts": result.counts.cpu(), **summary,
                            "history": result.history, "features": str(features)}, tmp)
        distrib.barrier()
        return summary
    finally:
        distrib.cleanup()


def attach(model_path: str, codebook: str, out_dir: str) -> dict:
    """A stage-2 model: the stage-1 weights of ``model_path`` with the k-means ``codebook``, as
    ``out_dir/model.safetensors`` (usable by load_image_tokenizer, ``vae_train tokenize`` and ``--init-from``)."""
    model = load_model(model_path)
    with user_errors(ValueError):
        model.set_codebook(load_centres(codebook))
    path = export(model, out_dir)
    return {"out": str(path), "codebook_size": model.num_tokens, "seq_len": model.seq_len}
