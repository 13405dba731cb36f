"""The training loop every trainer shares.

A model package describes its model as a :class:`Task` (modules to train, one loss per module, optional evaluation
and image samples); :class:`Trainer` does everything else: devices and DDP, precision, data order, gradient
accumulation and clipping, AdamW + LR schedule per module, logging, checkpoints, resume, signals.

Reproducibility: the data order of an epoch is a function of (seed, epoch) only, the loader position, every RNG state
and every optimizer state are in the checkpoint, so ``--resume latest`` after a kill continues the SAME trajectory
(on CPU, bit for bit, with any number of DataLoader workers: see :class:`SeededItems` for random augmentations).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from tqdm import tqdm

from train_runtime import checkpoint as ckpt
from train_runtime import distributed as distrib
from train_runtime import fsdp
from train_runtime.config import RuntimeConfig, to_dict
from train_runtime.optim import make_optimizer, make_scheduler
from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import write_json
from zh_t2i_base.precision import autocast as precision_autocast
from zh_t2i_base.precision import resolve_precision


class TrainingDiverged(UserError):
    """A loss became NaN/inf: the run stops with this message; the last good checkpoint stays."""


class Task:
    """What a model package hands the trainer. Subclass and fill in.

    ``trainer`` sets ``self.env`` (rank/device) and ``self.ddp`` (name -> the DDP-wrapped module, or the module itself
    on one process) before the first step: call ``self.ddp[name](...)`` in :meth:`training_step` so gradients are
    synchronised.
    """

    env: distrib.DistEnv
    ddp: dict[str, nn.Module]

    def modules(self) -> dict[str, nn.Module]:
        """Trained modules, one optimizer each, in the order their losses are applied."""
        raise NotImplementedError

    def training_step(self, batch: Any, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Losses per module name (each only trains that module) and extra scalars to log."""
        raise NotImplementedError

    def lr_scale(self, name: str) -> float:
        return 1.0

    def find_unused_parameters(self, name: str) -> bool:
        return False

    def evaluate(self, step: int) -> dict[str, float]:
        """Called on rank 0 every ``eval_every`` steps and at the end; returns metrics to log."""
        return {}

    def sample(self, step: int, run_dir: Path) -> None:
        """Called on rank 0 every ``sample_every`` steps and at the end; writes image grids into ``run_dir``."""

    def meta(self) -> dict:
        """Stored in every checkpoint: whatever rebuilds the model without the training code (kind, model config)."""
        return {}

    def on_load(self, state: dict) -> None:
        """Called after a checkpoint was restored (e.g. to restore a temperature schedule's extra state)."""

    def prepare_run_dir(self, run_dir: Path) -> None:
        """Called on rank 0 once every check passed and the run directory exists, before the first step: the
        package's own files in it (e.g. clip_train's ``open_clip_config.json`` and ``vocab.txt``)."""


class EpochSampler(Sampler[int]):
    """Per-rank indices of an epoch: a permutation that depends only on (seed, epoch), split across ranks like
    DistributedSampler (padded to equal length), optionally starting ``start`` samples in (for resume)."""

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


class SeededItems(Dataset):
    """The training set with every random draw an item makes (torch, numpy, ``random``: random crops, flips, ...) a
    function of (seed, epoch, index) alone, whichever DataLoader worker reads it and wherever the epoch was resumed:
    each item is read under RNGs seeded from these three (a ``collate_fn``'s draws are not covered). Torch's state is
    put back afterwards, and in the main process (``--workers 0``) numpy's and python's too."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + int(i)) % 2**63
        # a worker's RNGs serve its items only; the main process (--workers 0) gets its numpy and python states back
        # too (about 80 us an item, against about 10 us for the rest)
        saved = (random.getstate(), np.random.get_state()) if get_worker_info() is None else None
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # torch.manual_seed would also seed every CUDA device: 100 us
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.base[i]
            finally:
                if saved is not None:
                    random.setstate(saved[0])
                    np.random.set_state(saved[1])


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _batch_len(batch: Any, default: int) -> int:
    """Samples in a collated batch: the length of its first tensor (``default`` when it holds none)."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    return next((len(v) for v in values if isinstance(v, torch.Tensor) and v.ndim), default)


def _to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.ndim == 4 else batch
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_to_device(v, device, channels_last) for v in batch)
    return batch


class Trainer:
    def __init__(self, cfg: RuntimeConfig, task: Task, dataset: Dataset, collate_fn: Callable | None = None,
                 config: dict | None = None, shuffle: bool = True):
        self.cfg, self.task, self.dataset, self.collate_fn, self.shuffle = cfg, task, dataset, collate_fn, shuffle
        self.config = config if config is not None else {"runtime": to_dict(cfg)}
        self.run_dir = Path(cfg.out_dir)
        self._stop_signal = False
        for name, value, ok in (("--batch-size", cfg.batch_size, cfg.batch_size >= 1),
                                ("--grad-accum", cfg.grad_accum, cfg.grad_accum >= 1),
                                ("--max-steps", cfg.max_steps, cfg.max_steps >= 1),
                                ("--lr", cfg.lr, cfg.lr > 0), ("--workers", cfg.workers, cfg.workers >= 0),
                                ("--save-every", cfg.save_every, cfg.save_every >= 1),
                                ("--log-every", cfg.log_every, cfg.log_every >= 1)):
            if not ok:
                raise UserError(f"{name} must be positive, got {value}")
        if cfg.schedule not in ("cosine", "constant"):
            raise UserError(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
        if cfg.report_to not in ("none", "wandb"):
            raise UserError(f"--report-to must be none or wandb, got {cfg.report_to!r}")
        if cfg.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise UserError("--report-to wandb needs the wandb package: pip install '.[wandb]'")

    # ------------------------------------------------------------------------------------------------------------
    def _plan_data(self, env: distrib.DistEnv) -> tuple[EpochSampler | None, int]:
        """The epoch's sampler (None for a stream) and batches per process per epoch; refuses what cannot train.

        A listed data set (with ``__len__``) is read in a (seed, epoch) permutation; a stream (an IterableDataset:
        webdataset shards) needs ``--train-num-samples N``: an epoch is then N samples over all processes
        (N // (batch_size * world_size) batches per process, open_clip's convention)."""
        cfg = self.cfg
        n = cfg.train_num_samples
        if n < 0:
            raise UserError(f"--train-num-samples must be positive, got {n}")
        if hasattr(self.dataset, "__len__"):
            if cfg.dataset_resampled or n:
                flag = "--dataset-resampled" if cfg.dataset_resampled else "--train-num-samples"
                raise UserError(f"{flag} is for webdataset shards (a stream); this data set is a listing of "
                                f"{len(self.dataset)} samples, each epoch reads it once: leave {flag} out")
            sampler = EpochSampler(len(self.dataset), env.rank, env.world_size, cfg.seed, self.shuffle)
            if sampler.per_rank // cfg.batch_size < 1:
                raise UserError(f"the data set has {len(self.dataset)} samples: fewer than one batch of "
                                f"{cfg.batch_size} per process ({env.world_size} process(es))")
            return sampler, sampler.per_rank // cfg.batch_size
        if not hasattr(self.dataset, "set_epoch"):
            raise UserError(f"{type(self.dataset).__name__}: a data stream without set_epoch cannot be trained on")
        if n == 0:
            raise UserError("--train-data is a stream of webdataset shards (no length): give --train-num-samples N, "
                            "the samples of an epoch over all processes (e.g. about the shards' total)")
        batches = n // (cfg.batch_size * env.world_size)
        if batches < cfg.grad_accum:
            raise UserError(f"--train-num-samples {n} is less than one step: {cfg.batch_size} (--batch-size) x "
                            f"{cfg.grad_accum} (--grad-accum) x {env.world_size} process(es)")
        if hasattr(self.dataset, "configure_stream"):
            self.dataset.configure_stream(seed=cfg.seed, shuffle=self.shuffle, resampled=cfg.dataset_resampled)
        elif cfg.dataset_resampled:
            raise UserError(f"--dataset-resampled: {type(self.dataset).__name__} cannot resample its shards")
        return None, batches

    def _stream_batches(self, epoch: int, start: int, batches: int, env: distrib.DistEnv) -> Iterator[Any]:
        """Batches ``start`` .. ``batches`` of a stream's epoch; the stream knows the epoch (and a resumed epoch's
        start: see ``WebDatasetShards.set_epoch``). Every process takes the same number of batches."""
        cfg = self.cfg
        self.dataset.set_epoch(epoch, skip_batches=start, batch_size=cfg.batch_size)  # type: ignore[attr-defined]
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, drop_last=True, num_workers=cfg.workers,
                            collate_fn=self.collate_fn, worker_init_fn=_seed_worker,
                            generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
                            pin_memory=env.device.type == "cuda", persistent_workers=False)
        it = iter(loader)
        for i in range(start, batches):
            try:
                batch = next(it)
            except StopIteration:
                raise UserError(f"the data stream ended after {i} of the {batches} batches of epoch {epoch} on "
                                f"rank {env.rank}") from None
            except UserError as e:  # re-raised from a DataLoader worker with its traceback: keep the message
                lines = str(e).strip().splitlines()
                if len(lines) < 2:
                    raise
                raise UserError(lines[-1].split(": ", 1)[-1]) from None
            yield batch

    # ------------------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``max_steps`` (or ``max_time``, or SIGTERM); returns the last logged metrics and evaluation."""
        cfg = self.cfg
        env = distrib.setup(cfg.device)
        try:
            return self._fit(env)
        finally:
            distrib.cleanup()

    def _fit(self, env: distrib.DistEnv) -> dict:
        cfg, task = self.cfg, self.task
        # Everything that can refuse the run is checked before the run directory gets anything: after a bad start a
        # fresh --out-dir does not exist, an old one holds nothing new.
        precision = resolve_precision(cfg.precision, env.device)
        shard = cfg.fsdp and env.distributed  # one process: the same run, unsharded (and the same checkpoints)
        if cfg.fsdp and precision == "fp16":
            raise UserError("--fsdp trains in bf16 (fp32 reduction) or fp32, not fp16: use --precision bf16")
        if cfg.fsdp_param_dtype not in fsdp.PARAM_DTYPES:
            raise UserError(f"--fsdp-param-dtype must be fp32 or bf16, got {cfg.fsdp_param_dtype!r}")
        sampler, batches_per_epoch = self._plan_data(env)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        modules = task.modules()
        resume_path, state = ckpt.load_for_resume(cfg.resume, self.run_dir)
        if resume_path is not None:
            for name, module in modules.items():
                if name not in state.get("modules", {}):
                    raise UserError(f"{resume_path}: no state for module {name!r}; is it a checkpoint of this trainer?")
                with self._fitting(resume_path, state):
                    module.load_state_dict(state["modules"][name])
                    if shard and not fsdp.by_name(state["optimizers"][name]):  # a DDP / one-process checkpoint
                        state["optimizers"][name] = fsdp.named_optimizer_state(module, lambda m=module, n=name: (
                            make_optimizer(m, cfg.lr * task.lr_scale(n), cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                           torch.device("cpu"))), state["optimizers"][name])
        if env.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create run directory {self.run_dir}: {e.strerror or e}") from None
            ckpt.remove_stale_temps(self.run_dir)
            task.prepare_run_dir(self.run_dir)
        distrib.barrier()

        task.env = env
        task.ddp = {}
        optimizers, schedulers = {}, {}
        for name, module in modules.items():
            module.to(env.device)
            if cfg.channels_last:
                module.to(memory_format=torch.channels_last)
            fsdp.prepare(module, cfg.fsdp_param_dtype, shard=shard, checkpointing=cfg.activation_checkpointing)
            task.ddp[name] = (DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                  find_unused_parameters=task.find_unused_parameters(name))
                              if env.distributed and not shard else module)
            optimizers[name] = make_optimizer(module, cfg.lr * task.lr_scale(name), cfg.weight_decay,
                                              (cfg.beta1, cfg.beta2), env.device)
            schedulers[name] = make_scheduler(optimizers[name], cfg.warmup_steps, cfg.max_steps, cfg.schedule,
                                              cfg.min_lr_ratio)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        # with --fsdp-param-dtype bf16 the units compute in bf16 parameters (inputs cast at each unit), not autocast
        bf16_units = shard and cfg.fsdp_param_dtype == "bf16"
        autocast = contextlib.nullcontext() if bf16_units else precision_autocast(env.device, precision)

        step, epoch, batch_in_epoch = 0, 0, 0
        if resume_path is not None:
            for name in modules:
                with self._fitting(resume_path, state):
                    fsdp.load_optimizer_state(modules[name], optimizers[name], state["optimizers"][name])
                schedulers[name].load_state_dict(state["schedulers"][name])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            ckpt.set_rng_state(state["rng"])
            task.on_load(state)
            if env.is_main:
                self._truncate_metrics(step)
                print(f"resumed from {resume_path} at step {step}", flush=True)
        if env.is_main:
            write_json(self.run_dir / "config.json", {**self.config, "precision": precision,
                                                      "world_size": env.world_size})
        wandb_run = self._wandb(env) if cfg.report_to == "wandb" else None

        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        last_ckpt = resume_path
        bar = tqdm(total=cfg.max_steps, initial=step, desc=self.run_dir.name, unit="step", disable=not env.is_main,
                   dynamic_ncols=True)
        window: dict[str, list[float]] = defaultdict(list)
        window_samples, window_start = 0, time.perf_counter()
        t_start = time.perf_counter()
        last_log: dict = {}
        stop_reason = "max_steps"
        skipped_total = 0
        samples_seen = step * cfg.batch_size * cfg.grad_accum  # this rank's, counted batch by batch

        def save_now() -> Path | None:
            state = {
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "modules": {n: fsdp.full_model_state(m) if shard else m.state_dict() for n, m in modules.items()},
                "optimizers": {n: fsdp.full_optimizer_state(modules[n], o) if shard else o.state_dict()
                               for n, o in optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": ckpt.rng_state(), "config": self.config, "meta": task.meta(),
            }
            path = ckpt.save(state, self.run_dir, step, cfg.keep_last) if env.is_main else None
            distrib.barrier()
            return path

        items = SeededItems(self.dataset, cfg.seed) if sampler is not None else None
        try:
            while step < cfg.max_steps and stop_reason == "max_steps":
                if sampler is None:  # a stream of webdataset shards: an epoch is --train-num-samples samples
                    it = self._stream_batches(epoch, batch_in_epoch, batches_per_epoch, env)
                else:
                    sampler.set_epoch(epoch, start=batch_in_epoch * cfg.batch_size)
                    items.epoch = epoch
                    loader = DataLoader(items, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                        num_workers=cfg.workers, collate_fn=self.collate_fn,
                                        worker_init_fn=_seed_worker,
                                        generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
                                        pin_memory=env.device.type == "cuda", persistent_workers=False)
                    it = iter(loader)
                while step < cfg.max_steps:
                    micro = [b for b in (next(it, None) for _ in range(cfg.grad_accum)) if b is not None]
                    batch_in_epoch += len(micro)
                    if len(micro) < cfg.grad_accum:
                        epoch, batch_in_epoch = epoch + 1, 0  # the epoch is over (a partial group is dropped)
                        break
                    for name in modules:
                        optimizers[name].zero_grad(set_to_none=True)
                    for i, batch in enumerate(micro):
                        if isinstance(batch, Mapping) and "skipped" in batch:
                            skipped_total += int(batch["skipped"])
                        batch = _to_device(batch, env.device, cfg.channels_last)
                        self._micro_step(batch, step, i == len(micro) - 1, autocast, scaler, modules, window, env,
                                         last_ckpt)
                    window_samples += cfg.batch_size * len(micro) * env.world_size
                    samples_seen += sum(_batch_len(b, cfg.batch_size) for b in micro)
                    for name in modules:
                        opt = optimizers[name]
                        if scaler is not None:
                            scaler.unscale_(opt)
                        if cfg.grad_clip > 0:
                            norm = torch.nn.utils.clip_grad_norm_(modules[name].parameters(), cfg.grad_clip)
                            window[f"grad_norm/{name}"].append(float(norm))
                        if scaler is not None:
                            scaler.step(opt)
                        else:
                            opt.step()
                        schedulers[name].step()
                    if scaler is not None:
                        scaler.update()
                    step += 1
                    bar.update(1)

                    if step % cfg.log_every == 0 or step == cfg.max_steps:
                        elapsed = time.perf_counter() - window_start
                        means = distrib.mean_over_ranks({k: float(np.mean(v)) for k, v in sorted(window.items())},
                                                        env.device)
                        counts = distrib.mean_over_ranks({"n": float(skipped_total), "seen": float(samples_seen)},
                                                         env.device)  # sums over ranks, below
                        last_log = {"step": step, "epoch": epoch,
                                    "lr": schedulers[next(iter(modules))].get_last_lr()[0], **means,
                                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                                    "samples_seen": round(counts["seen"] * env.world_size),
                                    "skipped_images": round(counts["n"] * env.world_size)}
                        if env.is_main:
                            self._log(last_log, wandb_run)
                            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in last_log.items()
                                             if k.startswith("loss/")})
                        window.clear()
                        window_samples, window_start = 0, time.perf_counter()
                    if step % cfg.save_every == 0:
                        last_ckpt = save_now() or last_ckpt
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                        self._evaluate(env, step, wandb_run)
                    if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.max_steps:
                        self._sample(env, step)
                    out_of_time = cfg.max_time > 0 and time.perf_counter() - t_start > cfg.max_time
                    if distrib.any_true(self._stop_signal or out_of_time, env.device):
                        stop_reason = "sigterm" if self._stop_signal else "max_time"
                        break
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, old_handler)

        if step % cfg.save_every != 0:
            last_ckpt = save_now() or last_ckpt
        if stop_reason == "sigterm":
            if env.is_main:
                print(f"SIGTERM: saved step {step} to {self.run_dir}; resume with --resume latest", flush=True)
            return {"stopped": "sigterm", "step": step}
        result = {"train": last_log, "eval": self._evaluate(env, step, wandb_run), "step": step, "stopped": stop_reason,
                  "world_size": env.world_size}
        if env.distributed and not shard:
            result["rank_param_max_diff"] = _rank_param_divergence(modules, env.device)
        self._sample(env, step)
        weights = {n: fsdp.full_model_state(m) if shard else m.state_dict() for n, m in modules.items()}
        if env.is_main:
            for name in modules:
                ckpt.export_safetensors(weights[name], self.run_dir / f"{name}.safetensors",
                                        {"step": step, "meta": json.dumps(task.meta())})
            write_json(self.run_dir / "result.json", result)
        if wandb_run is not None:
            wandb_run.finish()
        return result

    # ------------------------------------------------------------------------------------------------------------
    def _micro_step(self, batch, step: int, sync: bool, autocast, scaler, modules: dict[str, nn.Module],
                    window: dict[str, list[float]], env: distrib.DistEnv, last_ckpt) -> None:
        """Forward + backward of one micro-batch; gradients are all-reduced only on the last one (``sync``)."""
        with contextlib.ExitStack() as stack:
            for m in self.task.ddp.values():
                if isinstance(m, DDP) and not sync:
                    stack.enter_context(m.no_sync())
                elif hasattr(m, "set_requires_gradient_sync"):  # FSDP: reduce-scatter on the last micro-batch only
                    m.set_requires_gradient_sync(sync)
            with autocast:
                losses, extra = self.task.training_step(batch, step)
            finite = all(bool(torch.isfinite(v.detach()).all()) for v in losses.values())
            if not distrib.all_true(finite, env.device):
                bad = {k: float(v.detach()) for k, v in losses.items()}
                raise TrainingDiverged(f"loss became NaN/inf at step {step} ({bad}); stopped. Last good checkpoint: "
                                       f"{last_ckpt or 'none yet'} (lower --lr, set --grad-clip, or use fp32)")
            names = list(losses)
            for name in names:
                loss = losses[name] / self.cfg.grad_accum
                params = [p for p in modules[name].parameters() if p.requires_grad] if len(names) > 1 else None
                (scaler.scale(loss) if scaler is not None else loss).backward(inputs=params)
                window[f"loss/{name}"].append(float(losses[name].detach()))
        for k, v in extra.items():
            window[k].append(float(v))

    @contextlib.contextmanager
    def _fitting(self, path: Path, state: dict) -> Iterator[None]:
        """Around loading a checkpoint's module or optimizer state: a checkpoint of another model (other sizes) is a
        one-line UserError naming the options that differ from those it was trained with."""
        try:
            yield
        except (RuntimeError, ValueError, KeyError) as e:
            changes = option_changes(state.get("config") or {}, self.config)
            why = ("these options differ from the checkpoint's: " + "; ".join(changes) if changes else
                   "its state does not fit (" + " ".join(str(e).split())[:300] + ")")
            raise UserError(f"--resume {path}: the checkpoint is of another model than these options build; {why} "
                            f"(resume with the options it was trained with, or train into a new --out-dir)") from None

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_signal = True

    def _log(self, row: dict, wandb_run=None) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def _truncate_metrics(self, step: int) -> None:
        """After a resume the log continues from the checkpoint: rows past it (from the killed run) are dropped, and
        so is a line a kill tore in half."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write: dropped
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode and no grad for the task's modules, train mode again afterwards."""
        modules = self.task.modules().values()
        for m in modules:
            m.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m in modules:
                m.train()

    def _evaluate(self, env: distrib.DistEnv, step: int, wandb_run=None) -> dict:
        metrics = {}
        with self._gathered(env):
            if env.is_main:
                with self._inference():
                    metrics = self.task.evaluate(step) or {}
                if metrics:
                    self._log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}, wandb_run)
            distrib.barrier()
        return metrics

    def _sample(self, env: distrib.DistEnv, step: int) -> None:
        with self._gathered(env):
            if env.is_main:
                with self._inference():
                    self.task.sample(step, self.run_dir)
            distrib.barrier()

    def _gathered(self, env: distrib.DistEnv):
        """Under FSDP, every rank gathers the full models so that rank 0 alone can evaluate or sample."""
        shard = self.cfg.fsdp and env.distributed
        return fsdp.gathered(list(self.task.ddp.values())) if shard else contextlib.nullcontext()

    def _wandb(self, env: distrib.DistEnv):
        if not env.is_main:
            return None
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb needs the wandb package: pip install '.[wandb]'") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        return wandb.init(project="zh-t2i", dir=str(self.run_dir), config=self.config, name=self.run_dir.name)


def option_changes(saved: dict, current: dict) -> list[str]:
    """``"--num-tokens 1024 here, 512 in the checkpoint"`` for each model/data option (every section of a run's
    config but ``runtime``) whose value in ``current`` differs from ``saved``."""

    def show(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return " ".join(map(show, value)) or "(none)"
        if isinstance(value, bool):
            return "on" if value else "off"
        return '""' if value == "" else str(value)

    out = []
    for section, values in current.items():
        old = saved.get(section)
        if section == "runtime" or not isinstance(values, Mapping) or not isinstance(old, Mapping):
            continue
        for key, value in values.items():
            if key in old and old[key] != value:
                out.append(f"--{key.replace('_', '-')} {show(value)} here, {show(old[key])} in the checkpoint")
    return out


def _rank_param_divergence(modules: dict[str, nn.Module], device: torch.device) -> float:
    """Largest difference between ranks of any per-tensor statistic (sum, sum of squares, first and last value) of
    the trained parameters: 0.0 when DDP kept every rank's model identical."""
    import torch.distributed as dist

    stats = []
    for m in modules.values():
        for p in m.parameters():
            flat = p.detach().double().flatten()
            stats.append(torch.stack([flat.sum(), (flat * flat).sum(), flat[0], flat[-1]]))
    mine = torch.cat(stats).to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)
