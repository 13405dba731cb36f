"""One command that exercises every CUDA path of the toolkit at realistic size on one H100/H200-class GPU (about
8 minutes), or with ``--tiny`` the SAME code paths at toy sizes on the CPU (under a minute; a test runs it).

Each stage runs a few dozen optimizer steps (``--tiny``: a few) through the toolkit's own entry points (the trainers'
``train(config, RuntimeConfig)``, the CLIs' ``main``, ``dalle_train.generate``, ``zh_t2i_rerank.registry.make_scorer``,
``brivl_infer.load``) on synthetic data (``form_data.synth``, random weights; nothing is downloaded) and records
steps/s, samples/s (tokens/s for DALLE), an MFU estimate (FLOPs per step counted by ``FlopCounterMode`` on the meta
device, stated in the output; MFU = FLOPs per step x steps/s / peak), the peak memory (``max_memory_allocated`` on a
GPU, the peak RSS of the process on a CPU) and whether the loss is finite and falls (mean of the first 3 logged steps
against the last 3). A stage that fails is recorded with its error and the others still run; the exit code is 1 if any
stage failed (a stage that cannot run here, e.g. fp16 on a CPU, is "skipped" with the reason).

    python bench/gpu_check.py                       # full size on CUDA: bench/gpu_results.{json,md}
    python bench/gpu_check.py --tiny --out /tmp/gc  # toy sizes on the CPU (default --out: a new temp folder)
    python bench/gpu_check.py --stages dvae,dalle,generate --device cuda:1

Stages: dvae, vqgan (GAN loss switched on after a few steps), dalle, clip (RN50, --local-loss --gather-with-grad),
styled_vq (full 2.36 B, activation checkpointing), fp16 (GradScaler), torchrun (--nproc_per_node 1), resume
(kill -9 and --resume latest against an uninterrupted run), generate (dalle_gen images/s at N = 64 with guidance,
batch-1 decode tokens/s against the memory-bandwidth bound), rerank (CLIP and BriVL at batch 32 in bf16/fp16 against
fp32 batch 1).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

STAGES = ("dvae", "vqgan", "dalle", "clip", "styled_vq", "fp16", "torchrun", "fsdp", "resume", "generate", "rerank")
PROMPT = "一个红色的圆形"

# Sizes per mode. "full": realistic on one H100/H200; "tiny": the same stages at toy sizes on a CPU.
SIZES: dict[str, dict] = {
    "full": {
        "data": {"image_size": 256, "n_train": 256, "repeat": 8, "n_val": 8},
        "dvae": {"image_size": 256, "num_layers": 4, "num_tokens": 1024, "emb_dim": 256, "hidden_dim": 64,
                 "batch": 64, "steps": 30},
        "vqgan": {"image_size": 256, "ch": 128, "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2,
                  "attn_resolutions": (16,), "z_channels": 256, "emb_dim": 256, "num_tokens": 1024, "disc_start": 10,
                  "batch": 8, "steps": 30},
        "dalle": {"dim": 512, "depth": 16, "heads": 8, "dim_head": 64, "text_seq_len": 32, "batch": 32,
                  "steps": 30},
        "clip": {"model": "RN50", "batch": 256, "steps": 30},
        "styled_vq": {"preset": "full", "batch": 32, "steps": 20},
        "fp16": {"steps": 30},
        "torchrun": {"steps": 20},
        "fsdp": {"preset": "small", "batch": 32, "steps": 20},
        "resume": {"steps": 30, "save_every": 10},
        "generate": {"n": 64, "cond_scale": 3.0, "top_k": 64, "batch": 64, "decode_repeats": 2},
        "rerank": {"clip_model": "RN50", "brivl_cfg": "tests/fixtures/brivl_full/test_xyb.yml", "images": 32,
                   "batch": 32},
        "workers": 6,
    },
    "tiny": {
        "data": {"image_size": 32, "n_train": 64, "repeat": 1, "n_val": 8},
        "dvae": {"image_size": 32, "num_layers": 2, "num_tokens": 64, "emb_dim": 16, "hidden_dim": 16,
                 "batch": 8, "steps": 8},
        "vqgan": {"image_size": 32, "ch": 32, "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 1,
                  "attn_resolutions": (2,), "z_channels": 32, "emb_dim": 32, "num_tokens": 64, "disc_start": 3,
                  "batch": 4, "steps": 8},
        "dalle": {"dim": 64, "depth": 2, "heads": 2, "dim_head": 32, "text_seq_len": 32, "batch": 8, "steps": 8},
        "clip": {"model": "zh-tiny", "batch": 16, "steps": 8},
        "styled_vq": {"preset": "tiny36", "batch": 4, "steps": 6},
        "fp16": {"steps": 8},
        "torchrun": {"steps": 4},
        "fsdp": {"preset": "tiny36", "batch": 8, "steps": 8},
        "resume": {"steps": 12, "save_every": 4},
        "generate": {"n": 8, "cond_scale": 3.0, "top_k": 8, "batch": 8, "decode_repeats": 1},
        "rerank": {"clip_model": "zh-tiny", "brivl_cfg": "tests/fixtures/brivl_tiny/brivl_tiny.yml", "images": 16,
                   "batch": 32},
        "workers": 0,
    },
}

# bf16 dense tensor-core peak (FLOP/s) and HBM bandwidth (bytes/s) by GPU name; first match wins.
GPU_PEAK = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12)]
GPU_BANDWIDTH = [("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("GH200", 4.0e12),
                 ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12)]


class StageSkipped(Exception):
    """A stage that cannot run on this device (the reason is recorded)."""


# ---------------------------------------------------------------------------------------------------------------------
# measuring


def _from_table(table: list[tuple[str, float]], name: str) -> float | None:
    return next((v for key, v in table if key in name), None)


def cpu_matmul_flops(n: int = 1024, seconds: float = 0.5) -> float:
    """Measured fp32 n x n matmul rate (FLOP/s) on the threads torch uses."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def gpu_matmul_flops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Measured bytes/s of a big tensor copy (read + write counted), best of 3."""
    src = torch.ones(mib * 2**18, device=device)  # float32: 4 bytes
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the process's peak RSS, reset at
    the start where Linux allows (``/proc/self/clear_refs``), else the peak since the process started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (process)"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "peak RSS (reset per stage)"
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        return None

    def value(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_flops(build: Callable[[], object], step: Callable[[object], torch.Tensor], model=None) -> float:
    """FLOPs of one training step (forward + backward of ``step``'s loss) of the model ``build`` makes (or of
    ``model``, moved to the meta device), counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
    (no memory, no compute: any size)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build() if model is None else model.to("meta")
        counter = FlopCounterMode(display=False)
        with counter:
            step(model).backward()
    return float(counter.get_total_flops())


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if "samples_per_s" in row:
                rows.append(row)
    return rows


def training_figures(rows: list[dict], loss_key: str, samples_per_step: int) -> dict:
    """steps/s and samples/s after warm-up (the first fifth of the steps, at least one, is left out), the loss at the
    start and the end (means of the first and last 3 logged steps), finite and falling."""
    if not rows:
        raise RuntimeError("metrics.jsonl holds no training rows")
    warm = max(1, len(rows) // 5) if len(rows) > 2 else 0
    timed = rows[warm:]
    step_seconds = [samples_per_step / max(r["samples_per_s"], 1e-12) for r in timed]
    steps_per_s = len(step_seconds) / sum(step_seconds)
    losses = [float(r[loss_key]) for r in rows if loss_key in r]
    k = max(1, min(3, len(losses) // 3))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    finite = all(math.isfinite(v) for v in losses)
    return {"steps": rows[-1]["step"], "timed_steps": len(step_seconds), "steps_per_s": steps_per_s,
            "samples_per_s": steps_per_s * samples_per_step, "loss_key": loss_key, "loss_first": first,
            "loss_last": last, "loss_finite": finite, "loss_falls": finite and last < first, "losses": losses}


# ---------------------------------------------------------------------------------------------------------------------
# the run


class Check:
    def __init__(self, tiny: bool, device: torch.device, work: Path):
        self.tiny, self.device, self.work = tiny, device, work
        self.sizes = SIZES["tiny" if tiny else "full"]
        self.precision = "bf16"
        self.cuda = device.type == "cuda"
        self._data: dict | None = None
        self._dalle_tokens: Path | None = None
        self.dalle_run: Path | None = None
        self.meta = self._hardware()

    # -- hardware --------------------------------------------------------------------------------------------------
    def _hardware(self) -> dict:
        meta = {"device": str(self.device), "torch": torch.__version__, "python": platform.python_version(),
                "machine": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "precision": self.precision, "mode": "tiny" if self.tiny else "full"}
        if self.cuda:
            name = torch.cuda.get_device_name(self.device)
            meta["gpu"] = name
            peak = _from_table(GPU_PEAK, name)
            meta["peak_flops"], meta["peak_source"] = (
                (peak, "table: bf16 dense tensor-core peak") if peak else
                (gpu_matmul_flops(self.device), "measured: bf16 8192^2 matmul"))
            bw = _from_table(GPU_BANDWIDTH, name)
            meta["bandwidth"], meta["bandwidth_source"] = (
                (bw, "table: HBM bandwidth") if bw else (copy_bandwidth(self.device, 1024), "measured: 1 GiB copy"))
        else:
            meta["gpu"] = None
            meta["peak_flops"] = cpu_matmul_flops(1024 if self.tiny else 2048, 0.3 if self.tiny else 1.0)
            meta["peak_source"] = "measured: fp32 matmul on the CPU"
            mib = 64 if self.tiny else 512
            meta["bandwidth"] = copy_bandwidth(self.device, mib)
            meta["bandwidth_source"] = f"measured: {mib} MiB memcpy (read + write)"
        return meta

    # -- shared inputs ---------------------------------------------------------------------------------------------
    def data(self) -> dict:
        """The synthetic set (``form_data.synth``) at the stages' image side; ``repeat`` lists each training image
        several times (a bigger epoch without rendering more)."""
        if self._data is None:
            from form_data.synth import write_dataset

            d = self.sizes["data"]
            root = self.work / "data"
            write_dataset(root, d["n_train"], d["n_val"], image_size=d["image_size"], progress=False)
            lines = (root / "train_clip.csv").read_text(encoding="utf-8").splitlines()
            big = root / "train_big_clip.csv"
            big.write_text("\n".join([lines[0]] + lines[1:] * d["repeat"]) + "\n", encoding="utf-8")
            self._data = {"root": root, "train": str(big), "val": str(root / "val_clip.csv")}
        return self._data

    def runtime(self, package: str, name: str, batch: int, steps: int, **kw):
        """The package's own CLI runtime defaults, then: a short constant schedule, a log row every step, one
        checkpoint at the end."""
        import importlib

        from train_runtime import RuntimeConfig

        defaults = importlib.import_module(f"{package}.__main__").RUNTIME_DEFAULTS
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        values = {**defaults, "out_dir": str(out), "device": str(self.device), "precision": self.precision,
                  "batch_size": batch, "max_steps": steps, "warmup_steps": 2, "schedule": "constant",
                  "log_every": 1, "save_every": 10**9, "keep_last": 1, "workers": self.sizes["workers"], "seed": 0,
                  **kw}
        return RuntimeConfig(**values)

    def train_stage(self, run: Callable[[], dict], rc, loss_key: str, flops: float, formula: str,
                    samples_per_step: int, tokens_per_sample: int | None = None) -> dict:
        with PeakMemory(self.device) as peak:
            t0 = time.perf_counter()
            result = run()
            wall = time.perf_counter() - t0
        out = {"config": {"batch_size": rc.batch_size, "max_steps": rc.max_steps, "precision": self.precision,
                          "lr": rc.lr, "device": rc.device}, "wall_s": wall,
               "peak_memory_bytes": peak.value(), "memory_kind": peak.kind}
        out.update(training_figures(read_metrics(Path(rc.out_dir)), loss_key, samples_per_step))
        if tokens_per_sample:
            out["tokens_per_s"] = out["samples_per_s"] * tokens_per_sample
        out.update(self.mfu(flops, formula, out["steps_per_s"]))
        out["stopped"] = result.get("stopped")
        return out

    def mfu(self, flops: float, formula: str, steps_per_s: float) -> dict:
        achieved = flops * steps_per_s
        return {"flops_per_step": flops, "flop_formula": formula, "achieved_flops": achieved,
                "peak_flops": self.meta["peak_flops"], "mfu": achieved / self.meta["peak_flops"]}

    def drop_checkpoints(self, run_dir: Path) -> None:
        """Checkpoints of a finished stage are not needed (the full Styled-VQ's is about 28 GB)."""
        for pattern in ("ckpt-*.pt", "*.safetensors"):
            for p in run_dir.glob(pattern):
                p.unlink(missing_ok=True)

    # -- image tokenizers ------------------------------------------------------------------------------------------
    def vae_config(self, kind: str):
        from vae_train.train import VAEConfig

        s = self.sizes[kind]
        keys = {"dvae": ("image_size", "num_layers", "num_tokens", "emb_dim", "hidden_dim"),
                "vqgan": ("image_size", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
                          "emb_dim", "num_tokens", "disc_start")}[kind]
        extra = {"gan": True} if kind == "vqgan" else {}
        return VAEConfig(model=kind, train_data=self.data()["train"], **{k: s[k] for k in keys}, **extra)

    def stage_dvae(self) -> dict:
        from vae_train.train import build_model, train

        s = self.sizes["dvae"]
        vc = self.vae_config("dvae")
        rc = self.runtime("vae_train", "dvae", s["batch"], s["steps"])
        x = lambda: torch.rand(s["batch"], 3, s["image_size"], s["image_size"])  # noqa: E731
        flops = count_flops(lambda: build_model(vc), lambda m: m(x(), 1.0)[0])
        out = self.train_stage(lambda: train(vc, rc), rc, "loss/model", flops,
                               "FlopCounterMode: dVAE forward + backward (convs) x batch", s["batch"])
        self.drop_checkpoints(Path(rc.out_dir))
        return {**out, "model": {k: s[k] for k in s if k not in ("batch", "steps")}}

    def stage_vqgan(self) -> dict:
        from vae_train.train import build_model, train
        from vae_train.vqgan_loss import VQGANLoss

        s = self.sizes["vqgan"]
        vc = self.vae_config("vqgan")
        rc = self.runtime("vae_train", "vqgan", s["batch"], s["steps"], lr=2e-4)

        def step(models):
            model, disc = models
            out = model(torch.rand(s["batch"], 3, s["image_size"], s["image_size"]))
            g = (out.inputs - out.recon).abs().mean() + out.codebook_loss.mean() - disc(out.recon).mean()
            g.backward()
            return disc(out.inputs.detach()).mean() - disc(out.recon.detach()).mean()

        flops = count_flops(lambda: (build_model(vc), VQGANLoss(gan=True).discriminator), step)
        out = self.train_stage(lambda: train(vc, rc), rc, "g/rec", flops,
                               "FlopCounterMode: VQGAN fwd+bwd + discriminator on fake (G) and real+fake (D), after "
                               "disc_start; the adaptive weight's two last-layer grads not counted", s["batch"])
        rows = read_metrics(Path(rc.out_dir))
        on = [r for r in rows if r.get("g/disc_factor", 0) > 0]
        out["gan_on_from_step"] = on[0]["step"] if on else None
        out["disc_loss_finite"] = all(math.isfinite(r.get("loss/disc", 0.0)) for r in rows)
        if not on:
            raise RuntimeError("the GAN loss never switched on")
        if not out["disc_loss_finite"]:
            raise RuntimeError("the discriminator loss is not finite")
        self.drop_checkpoints(Path(rc.out_dir))
        return {**out, "model": {k: s[k] for k in s if k not in ("batch", "steps")}}

    # -- DALLE -----------------------------------------------------------------------------------------------------
    def dalle_tokens(self) -> Path:
        """A token file as users make it: a dVAE of the dvae stage's size (one training step: its codes are all the
        DALLE needs) and ``vae_train.tokenize``."""
        if self._dalle_tokens is None:
            from vae_train.tokenize import tokenize
            from vae_train.train import train

            vc = self.vae_config("dvae")
            rc = self.runtime("vae_train", "dalle_tokenizer", 4, 1)
            train(vc, rc)
            out = self.work / "dalle_tokens.pt"
            tokenize(rc.out_dir, self.data()["train"], out, batch_size=64, workers=0, device=str(self.device),
                     progress=False)
            self._dalle_tokens = out
        return self._dalle_tokens

    def dalle_config(self):
        from dalle_train.train import DALLETrainConfig

        s = self.sizes["dalle"]
        return DALLETrainConfig(train_data=str(self.dalle_tokens()), dim=s["dim"], depth=s["depth"],
                                heads=s["heads"], dim_head=s["dim_head"], text_seq_len=s["text_seq_len"],
                                null_cond_prob=0.2, sample_images=0)

    def _dalle_stage(self, name: str, steps: int) -> dict:
        from dalle_train.train import build, train

        s = self.sizes["dalle"]
        dc = self.dalle_config()
        rc = self.runtime("dalle_train", name, s["batch"], steps)
        _, task, _ = build(dc)
        cfg = task.model.cfg
        tokens = cfg.text_seq_len + cfg.image_seq_len  # positions trained per sample (BOS .. last-but-one image token)
        params = sum(p.numel() for p in task.model.blocks.parameters())
        del task

        def step(model):
            text = torch.randint(0, cfg.num_text_tokens, (s["batch"], cfg.text_seq_len))
            image = torch.randint(0, cfg.num_image_tokens, (s["batch"], cfg.image_seq_len))
            text_logits, image_logits = model.logits(text, image[:, :-1])  # DALLE.forward's loss, without its logs
            w = cfg.loss_img_weight
            return (F.cross_entropy(text_logits.flatten(0, 1).float(), text.flatten())
                    + w * F.cross_entropy(image_logits.flatten(0, 1).float(), image.flatten())) / (w + 1)

        from dalle_train.model import DALLE

        flops = count_flops(lambda: DALLE(cfg), step)
        formula = (f"FlopCounterMode: DALLE fwd+bwd incl. attention and both heads; cross-check 6 * block params "
                   f"({params / 1e6:.1f}M) * tokens ({s['batch']} x {tokens}) = {6 * params * s['batch'] * tokens:.3g}")
        out = self.train_stage(lambda: train(dc, rc), rc, "loss/dalle", flops, formula, s["batch"], tokens)
        out["model"] = {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "text_seq_len": cfg.text_seq_len,
                        "image_seq_len": cfg.image_seq_len, "num_image_tokens": cfg.num_image_tokens,
                        "parameters": sum(p.numel() for p in DALLE(cfg).parameters())}
        return out

    def stage_dalle(self) -> dict:
        out = self._dalle_stage("dalle", self.sizes["dalle"]["steps"])
        self.dalle_run = self.work / "runs" / "dalle"
        return out

    def stage_fp16(self) -> dict:
        if not self.cuda:
            from zh_t2i_base.cli import UserError
            from zh_t2i_base.precision import check_precision

            try:
                check_precision("fp16", self.device)
            except UserError as e:
                raise StageSkipped(f"needs CUDA: the toolkit refuses fp16 on a CPU ({e})") from None
            raise RuntimeError("fp16 was accepted on a CPU")
        old = self.precision
        self.precision = "fp16"
        try:
            out = self._dalle_stage("dalle_fp16", self.sizes["fp16"]["steps"])
        finally:
            self.precision = old
        out["config"]["grad_scaler"] = True
        self.drop_checkpoints(self.work / "runs" / "dalle_fp16")
        return out

    # -- CLIP ------------------------------------------------------------------------------------------------------
    def stage_clip(self) -> dict:
        from clip_train.train import ClipConfig, build, train

        s = self.sizes["clip"]
        cc = ClipConfig(model=s["model"], train_data=self.data()["train"], local_loss=True, gather_with_grad=True)
        rc = self.runtime("clip_train", "clip", s["batch"], s["steps"], lr=5e-4)
        model, _, meta = build(cc)
        size, ctx = meta["image_size"], meta["context_length"]

        def step(model):
            images = torch.rand(s["batch"], 3, size, size)
            text = torch.randint(0, 100, (s["batch"], ctx))
            img, txt, scale = model(images, text)[:3]
            return (scale * img @ txt.t()).logsumexp(1).mean()

        flops = count_flops(lambda: None, step, model=model)  # open_clip builds on the CPU, then moved to meta
        del model
        out = self.train_stage(lambda: train(cc, rc), rc, "loss/model", flops,
                               "FlopCounterMode: image + text tower fwd+bwd and the logits", s["batch"])
        out["model"] = {"name": s["model"], "image_size": size, "local_loss": True, "gather_with_grad": True}
        self.drop_checkpoints(Path(rc.out_dir))
        return out

    # -- Styled-VQ -------------------------------------------------------------------------------------------------
    def stage_styled_vq(self) -> dict:
        from styled_vq.train import SVQTrainConfig, train
        from vae_train.styled import StyledVQ, count_parameters, preset

        s = self.sizes["styled_vq"]
        mc = preset(s["preset"])
        tc = SVQTrainConfig(stage=1, preset=s["preset"], train_data=self.data()["train"], grad_checkpointing=True)
        rc = self.runtime("styled_vq", "styled_vq", s["batch"], s["steps"], lr=3e-4)
        with torch.device("meta"):
            params = count_parameters(StyledVQ(mc))

        def step(model):
            recon = model(torch.rand(s["batch"], 3, mc.image_size, mc.image_size), quantize=False)[0]
            return recon.float().pow(2).mean()

        flops = count_flops(lambda: StyledVQ(mc), step)
        out = self.train_stage(lambda: train(mc, tc, rc), rc, "loss/model", flops,
                               "FlopCounterMode: encoder + decoder fwd+bwd (model FLOPs: the activation-checkpoint "
                               "recompute is not counted)", s["batch"])
        out["model"] = {"preset": s["preset"], "parameters": params, "image_size": mc.image_size,
                        "grad_checkpointing": True}
        self.drop_checkpoints(Path(rc.out_dir))
        return out

    # -- processes: torchrun and kill + resume ---------------------------------------------------------------------
    def dvae_argv(self, out_dir: Path, steps: int, save_every: int) -> list[str]:
        s = self.sizes["dvae"]
        return ["--model", "dvae", "--train-data", self.data()["train"], "--image-size", str(s["image_size"]),
                "--num-layers", str(s["num_layers"]), "--num-tokens", str(s["num_tokens"]),
                "--emb-dim", str(s["emb_dim"]), "--hidden-dim", str(s["hidden_dim"]),
                "--batch-size", str(s["batch"]), "--max-steps", str(steps), "--save-every", str(save_every),
                "--keep-last", "3", "--warmup-steps", "2", "--schedule", "constant", "--log-every", "1",
                "--workers", str(self.sizes["workers"]), "--seed", "0", "--precision", self.precision,
                "--device", "auto" if self.cuda else "cpu", "--out-dir", str(out_dir)]

    def child(self, argv: list[str], report: Path, kill_at_save: int = 0, torchrun: bool = False,
              timeout: float = 600) -> subprocess.CompletedProcess:
        spec = json.dumps({"module": "vae_train", "argv": argv, "report": str(report), "kill_at_save": kill_at_save})
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec]
        if torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *cmd[1:]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    def stage_torchrun(self) -> dict:
        s = self.sizes["dvae"]
        steps = self.sizes["torchrun"]["steps"]
        run_dir = self.work / "runs" / "torchrun"
        shutil.rmtree(run_dir, ignore_errors=True)
        report = self.work / "torchrun_report.json"
        t0 = time.perf_counter()
        proc = self.child(self.dvae_argv(run_dir, steps, 10**9), report, torchrun=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited {proc.returncode}: {_tail(proc.stderr)}")
        result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
        child = json.loads(report.read_text(encoding="utf-8"))
        if result.get("world_size") != 1 or child.get("env_world_size") != 1:
            raise RuntimeError(f"expected torchrun's WORLD_SIZE 1, got {child.get('env_world_size')} "
                               f"(run: {result.get('world_size')})")
        expected = "nccl" if self.cuda else "gloo"
        out = {"command": "torchrun --standalone --nproc_per_node 1 -m vae_train (dVAE)", "wall_s": wall,
               "backend": child.get("backend") or "none",
               "backend_note": f"the process group ({expected}) was joined, the model wrapped in DDP",
               "world_size": result["world_size"], "peak_memory_bytes": child.get("peak_memory_bytes"),
               "memory_kind": child.get("memory_kind")}
        out.update(training_figures(read_metrics(run_dir), "loss/model", s["batch"]))
        vc = self.vae_config("dvae")
        from vae_train.train import build_model

        flops = count_flops(lambda: build_model(vc),
                            lambda m: m(torch.rand(s["batch"], 3, s["image_size"], s["image_size"]), 1.0)[0])
        out.update(self.mfu(flops, "as the dvae stage", out["steps_per_s"]))
        if child.get("backend") is None:
            raise RuntimeError(f"torchrun: no process group joined (expected {expected})")
        if child.get("backend") not in (None, expected):
            raise RuntimeError(f"process group backend {child.get('backend')}, expected {expected}")
        self.drop_checkpoints(run_dir)
        return out

    def stage_fsdp(self) -> dict:
        """Styled-VQ under ``torchrun`` on every local GPU (one CPU process in --tiny) with ``--fsdp
        --activation-checkpointing`` in bf16: FSDP2 units per block, nccl, the gathered eval, full-state checkpoints."""
        s = self.sizes["fsdp"]
        procs = max(1, torch.cuda.device_count()) if self.cuda else 1
        run_dir = self.work / "runs" / "fsdp"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m",
               "styled_vq", "--stage", "1", "--preset", s["preset"], "--train-data", self.data()["train"],
               "--val-data", self.data()["val"], "--eval-images", "8", "--fsdp", "--activation-checkpointing",
               "--precision", self.precision, "--batch-size", str(s["batch"]), "--max-steps", str(s["steps"]),
               "--log-every", "1", "--warmup-steps", "2", "--schedule", "constant", "--lr", "1e-3",
               "--save-every", str(10**9), "--workers", str(self.sizes["workers"]),
               "--device", "auto" if self.cuda else "cpu", "--out-dir", str(run_dir)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun --fsdp exited {proc.returncode}: {_tail(proc.stderr)}")
        result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
        out = {"command": f"torchrun --nproc_per_node {procs} -m styled_vq --preset {s['preset']} --fsdp "
                          f"--activation-checkpointing --precision {self.precision}",
               "wall_s": time.perf_counter() - t0, "world_size": result["world_size"],
               "eval": result.get("eval"), "peak_memory_bytes": None, "memory_kind": "not recorded (child processes)"}
        out.update(training_figures(read_metrics(run_dir), "loss/model", s["batch"] * procs))
        self.drop_checkpoints(run_dir)
        return out

    def stage_resume(self) -> dict:
        """An uninterrupted run (in this process, through the CLI's ``main``) against a run killed with SIGKILL as it
        reaches its second checkpoint (``kill -9`` from inside, at a fixed step: the rows logged after the first
        checkpoint are there, the checkpoint is not) and resumed with ``--resume latest``: every logged loss must be
        the same (bit for bit on a CPU; on a GPU within 2%, cuDNN's kernels not being deterministic)."""
        import vae_train.__main__ as cli

        s = self.sizes["dvae"]
        r = self.sizes["resume"]
        ref_dir, run_dir = self.work / "runs" / "resume_ref", self.work / "runs" / "resume"
        for d in (ref_dir, run_dir):
            shutil.rmtree(d, ignore_errors=True)
        with PeakMemory(self.device) as peak, contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            cli.main(self.dvae_argv(ref_dir, r["steps"], r["save_every"]))
            ref_wall = time.perf_counter() - t0
        argv = self.dvae_argv(run_dir, r["steps"], r["save_every"])
        killed = self.child(argv, self.work / "killed_report.json", kill_at_save=2)
        if killed.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run to kill exited {killed.returncode}, not by SIGKILL: {_tail(killed.stderr)}")
        ckpts = sorted(p.name for p in run_dir.glob("ckpt-*.pt"))
        logged_before = [row["step"] for row in read_metrics(run_dir)]
        report = self.work / "resumed_report.json"
        resumed = self.child([*argv, "--resume", "latest"], report)
        if resumed.returncode != 0:
            raise RuntimeError(f"the resumed run exited {resumed.returncode}: {_tail(resumed.stderr)}")
        ref = {row["step"]: row["loss/model"] for row in read_metrics(ref_dir)}
        got = {row["step"]: row["loss/model"] for row in read_metrics(run_dir)}
        if sorted(got) != sorted(ref):
            raise RuntimeError(f"logged steps differ: {sorted(got)} vs uninterrupted {sorted(ref)}")
        diffs = [abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref]
        tolerance = 0.02 if self.cuda else 0.0
        out = {"killed_at": f"entering the checkpoint of step {2 * r['save_every']} (SIGKILL)",
               "checkpoints_at_kill": ckpts, "steps_logged_at_kill": max(logged_before, default=0),
               "resumed_from_step": r["save_every"], "steps": r["steps"],
               "identical": all(got[k] == ref[k] for k in ref), "max_rel_diff": max(diffs), "tolerance": tolerance,
               "peak_memory_bytes": peak.value(), "memory_kind": peak.kind + " (the uninterrupted run)",
               "uninterrupted_wall_s": ref_wall}
        out.update(training_figures(read_metrics(ref_dir), "loss/model", s["batch"]))
        if max(diffs) > tolerance:
            raise RuntimeError(f"losses after resume differ from the uninterrupted run by up to {max(diffs):.3g} "
                               f"(relative; tolerance {tolerance})")
        for d in (ref_dir, run_dir):
            self.drop_checkpoints(d)
        return out

    # -- generation ------------------------------------------------------------------------------------------------
    def stage_generate(self) -> dict:
        import dalle_gen
        from dalle_train.generate import encode_prompt, load_dalle
        from dalle_train.sample import sample_tokens

        g = self.sizes["generate"]
        run = self.dalle_run
        if run is None or not any(run.glob("ckpt-*.pt")):
            self._dalle_stage("dalle_for_generate", 2)
            run = self.work / "runs" / "dalle_for_generate"
        out_dir = self.work / "generated"
        argv = [PROMPT, str(g["n"]), str(out_dir), "--checkpoint", str(run), "--cond-scale", str(g["cond_scale"]),
                "--top-k", str(g["top_k"]), "--batch-size", str(g["batch"]), "--device", str(self.device),
                "--quiet", "--overwrite"]
        buf = io.StringIO()
        with PeakMemory(self.device) as peak, contextlib.redirect_stdout(buf):
            dalle_gen.main(argv)
        line = json.loads(buf.getvalue().strip().splitlines()[-1])
        made = sorted(out_dir.glob("*.png"))
        if len(made) < g["n"]:
            raise RuntimeError(f"dalle_gen.py wrote {len(made)} of {g['n']} images")
        out = {"command": "dalle_gen.py " + " ".join(argv[1:2] + argv[3:]), "images": line["images"],
               "images_per_s": line["images_per_s"], "generation_seconds": line["seconds"],
               "peak_memory_bytes": peak.value(), "memory_kind": peak.kind}

        # batch-1 decode, no guidance: tokens/s against the memory-bandwidth bound of one decode step
        bundle = load_dalle(run, self.device)
        model, cfg = bundle.model, bundle.model.cfg
        ids, _ = encode_prompt(bundle, PROMPT)
        sample_tokens(model, ids, [0], batch_size=1, top_k=g["top_k"])  # warm-up
        best = float("inf")
        for r in range(g["decode_repeats"]):
            if self.cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            sample_tokens(model, ids, [r + 1], batch_size=1, top_k=g["top_k"])
            if self.cuda:
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - t0)
        tokens_per_s = cfg.image_seq_len / best
        elem = model.text_emb.weight.element_size()
        weights = sum(p.numel() for p in [*model.blocks.parameters(), *model.norm_out.parameters(),
                                           *model.to_image_logits.parameters()]) * elem
        positions = (2 * cfg.image_fmap_size if cfg.image_fmap_size else cfg.image_seq_len) * cfg.dim * elem
        weights += positions + cfg.dim * elem  # the position tables read per step + one embedding row
        per_position = 2 * cfg.depth * cfg.heads * cfg.dim_head * elem  # K and V of one position, every layer
        lengths = [1 + cfg.text_seq_len + i + 1 for i in range(cfg.image_seq_len - 1)]  # keys read at each step
        kv = per_position * sum(lengths) / len(lengths)
        bound = self.meta["bandwidth"] / (weights + kv)
        out.update({"decode_tokens_per_s": tokens_per_s, "decode_bytes_per_token": weights + kv,
                    "decode_weight_bytes": weights, "decode_kv_bytes_mean": kv,
                    "decode_bound_tokens_per_s": bound, "decode_ratio_to_bound": tokens_per_s / bound,
                    "bandwidth": self.meta["bandwidth"], "bandwidth_source": self.meta["bandwidth_source"],
                    "decode_formula": "bytes/token = weights read per step (blocks, final norm, image head, position "
                                      "tables, one embedding row; fp32 as dalle_gen runs) + mean K/V bytes read "
                                      "(2 * depth * heads * dim_head * 4 * cached positions); bound = bandwidth / "
                                      "bytes; batch 1, no guidance, top-k sampling included"})
        return out

    # -- reranking -------------------------------------------------------------------------------------------------
    def stage_rerank(self) -> dict:
        import numpy as np
        from PIL import Image

        from zh_t2i_rerank.registry import make_scorer

        r = self.sizes["rerank"]
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((256, 256),
                                                                                        Image.BILINEAR)
                  for _ in range(r["images"])]
        specs = {f"clip {r['clip_model']}": f"clip:{self.random_clip(r['clip_model'])}",
                 "brivl " + Path(r["brivl_cfg"]).stem: "brivl:{}:{}".format(*self.random_brivl(r["brivl_cfg"]))}
        out: dict = {"images": len(images), "batch": r["batch"]}
        with PeakMemory(self.device) as peak:
            for name, spec in specs.items():
                rows: dict = {}
                base = None
                for precision, batch in (("fp32", 1), ("bf16", r["batch"]), ("fp16", r["batch"])):
                    key = f"{precision}_batch{batch}"
                    if precision == "fp16" and not self.cuda:
                        rows[key] = {"skipped": "needs CUDA: fp16 is refused on a CPU"}
                        continue
                    scorer = make_scorer(spec, device=str(self.device), batch_size=batch, precision=precision)
                    scorer.score(PROMPT, images[:2])  # warm-up
                    if self.cuda:
                        torch.cuda.synchronize(self.device)
                    t0 = time.perf_counter()
                    scores = scorer.score(PROMPT, images)
                    if self.cuda:
                        torch.cuda.synchronize(self.device)
                    seconds = time.perf_counter() - t0
                    rows[key] = {"images_per_s": len(images) / seconds}
                    if base is None:
                        base = (rows[key]["images_per_s"], np.asarray(scores))
                    else:
                        rows[key]["ratio_to_fp32_batch1"] = rows[key]["images_per_s"] / base[0]
                        rows[key]["max_abs_score_diff"] = float(np.abs(np.asarray(scores) - base[1]).max())
                    del scorer
                out[name] = rows
            out["peak_memory_bytes"], out["memory_kind"] = peak.value(), peak.kind
        return out

    def random_clip(self, name: str) -> Path:
        """A random-weight CLIP saved as ``python -m clip_train`` saves it (``model.safetensors`` with its meta)."""
        from clip_train.train import ClipConfig, build
        from train_runtime.checkpoint import export_safetensors

        torch.manual_seed(0)
        net, _, meta = build(ClipConfig(model=name))
        out = self.work / "rerank_clip"
        out.mkdir(parents=True, exist_ok=True)
        export_safetensors(net.state_dict(), out / "model.safetensors", {"step": 0, "meta": json.dumps(meta)})
        return out

    def random_brivl(self, cfg: str) -> tuple[Path, Path]:
        """(yml, checkpoint) of a random-weight BriVL of the yml's architecture, in the original checkpoint format."""
        from brivl_infer.load import build_model, read_config, resolve_encoder
        from form_data.tokenizer import load_tokenizer

        yml = REPO / cfg
        model_cfg, _ = read_config(yml)
        model_cfg.bert, vocab = resolve_encoder(model_cfg.encoder, yml.parent)
        torch.manual_seed(0)
        model = build_model(model_cfg, load_tokenizer(vocab))
        path = self.work / "brivl_random.pth"
        torch.save({"learnable": model.state_dict()}, path)
        return yml, path

    # -- driver ----------------------------------------------------------------------------------------------------
    def run(self, stages: list[str]) -> dict:
        results = {}
        for name in stages:
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                res = {"status": "ok", **getattr(self, f"stage_{name}")()}
                if "loss_finite" in res and not res["loss_finite"]:
                    res["status"], res["error"] = "failed", "the loss is not finite"
                elif "loss_falls" in res and not res["loss_falls"]:
                    res["status"], res["error"] = "failed", "the loss did not fall"
            except StageSkipped as e:
                res = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001  (a stage's failure is recorded; the others still run)
                res = {"status": "failed", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}",
                       "traceback": traceback.format_exc()[-3000:]}
            res["seconds"] = time.perf_counter() - t0
            results[name] = res
            print(f"[gpu_check] {name}: {res['status']} ({res['seconds']:.1f} s)"
                  + (f" {res.get('error') or res.get('reason')}" if res["status"] != "ok" else ""),
                  file=sys.stderr, flush=True)
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        return results


def _tail(text: str, n: int = 600) -> str:
    return " ".join(text.split())[-n:]


# ---------------------------------------------------------------------------------------------------------------------
# output


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.3g} {suffix}{unit}".rstrip()
        return f"{v:.3g}{(' ' + unit) if unit else ''}"
    return f"{v}{(' ' + unit) if unit else ''}"


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f} MiB"


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"GPU check ({m['mode']}), {m['date']}: {m.get('gpu') or 'CPU'} ({m['device']}), torch {m['torch']}, "
             f"precision {m['precision']}; peak {_fmt(m['peak_flops'], 'FLOP/s')} ({m['peak_source']}), bandwidth "
             f"{_fmt(m['bandwidth'], 'B/s')} ({m['bandwidth_source']}); {m['wall_s']:.0f} s in all. "
             f"Made by `python bench/gpu_check.py{' --tiny' if m['mode'] == 'tiny' else ''}`.", "",
             "| stage | status | steps/s | samples/s | tokens/s | FLOP/step | MFU | peak memory | loss first → last |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, r in doc["stages"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']}: {r.get('error') or r.get('reason')} | | | | | | | |")
            continue
        loss = (f"{r['loss_first']:.4g} → {r['loss_last']:.4g}" if "loss_first" in r else "-")
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(f"| {name} | ok | {_fmt(r.get('steps_per_s'))} | {_fmt(r.get('samples_per_s'))} | "
                     f"{_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('flops_per_step'))} | {mfu} | "
                     f"{_mib(r.get('peak_memory_bytes'))} | {loss} |")
        if "flop_formula" in r and r["flop_formula"] != "as the dvae stage":
            notes.append(f"- {name}: FLOPs = {r['flop_formula']}")
        if name == "generate":
            notes.append(f"- generate: {r['images']} images at {r['images_per_s']:.3g} images/s (guidance); batch-1 "
                         f"decode {r['decode_tokens_per_s']:.4g} tokens/s against a bound of "
                         f"{r['decode_bound_tokens_per_s']:.4g} ({100 * r['decode_ratio_to_bound']:.1f}%; "
                         f"{r['decode_bytes_per_token'] / 2**20:.1f} MiB read per token)")
        if name == "rerank":
            for model, rows in r.items():
                if isinstance(rows, dict) and "fp32_batch1" in rows:
                    parts = [f"{k} {v['images_per_s']:.3g} images/s" + (
                        f" ({v['ratio_to_fp32_batch1']:.2f}x)" if "ratio_to_fp32_batch1" in v else "")
                        if "images_per_s" in v else f"{k} skipped" for k, v in rows.items()]
                    notes.append(f"- rerank {model}: " + "; ".join(parts))
        if name == "resume":
            same = "identical" if r["identical"] else f"max relative difference {r['max_rel_diff']:.2g}"
            notes.append(f"- resume: killed {r['killed_at']}, resumed from step {r['resumed_from_step']}; losses "
                         f"{same} to the uninterrupted run")
        if name == "torchrun":
            notes.append(f"- torchrun: world size {r['world_size']}; {r['backend_note']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# entry points


def child_main(spec: dict) -> None:
    """A trainer CLI in a child process (plain or under torchrun) that reports its peak memory and process group;
    ``kill_at_save`` N: SIGKILL itself as the run enters its N-th checkpoint."""
    from train_runtime import checkpoint as ckpt

    if spec.get("kill_at_save"):
        save, calls = ckpt.save, [0]

        def killing_save(*args, **kw):
            calls[0] += 1
            if calls[0] >= spec["kill_at_save"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return save(*args, **kw)

        ckpt.save = killing_save
    import torch.distributed as dist

    seen = {}
    init = dist.init_process_group

    def remembering_init(*args, **kw):
        init(*args, **kw)
        seen["backend"], seen["world_size"] = dist.get_backend(), dist.get_world_size()

    dist.init_process_group = remembering_init
    sys.argv = [spec["module"], *spec["argv"]]
    try:
        runpy.run_module(spec["module"], run_name="__main__", alter_sys=True)
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            peak = (torch.cuda.max_memory_allocated() if cuda else
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            Path(spec["report"]).write_text(json.dumps({
                "peak_memory_bytes": peak, "memory_kind": "cuda max_memory_allocated (child)" if cuda else
                "peak RSS (child)", "backend": seen.get("backend"), "world_size": seen.get("world_size"),
                "env_world_size": int(os.environ.get("WORLD_SIZE", "1"))}))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU, under a minute): the same code paths")
    ap.add_argument("--out", help="folder for gpu_results.json/.md (default: bench/ at full size, a new temp folder "
                                  "with --tiny)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of: {','.join(STAGES)}")
    ap.add_argument("--device", default="", help="cpu | cuda | cuda:N (default: cuda at full size, cpu with --tiny)")
    ap.add_argument("--work", help="scratch folder for data and runs (default: a temp folder, removed at the end)")
    a = ap.parse_args(argv)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    device = torch.device(a.device or ("cpu" if a.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --tiny (CPU) or --device cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp(prefix="gpu_check_")) if a.tiny else REPO / "bench")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        check = Check(a.tiny, device, work)
        results = check.run(stages)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    meta = {**check.meta, "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.perf_counter() - t0,
            "stages": stages, "sizes": SIZES["tiny" if a.tiny else "full"]}
    doc = {"meta": meta, "stages": results}
    (out / "gpu_results.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n",
                                          encoding="utf-8")
    (out / "gpu_results.md").write_text(markdown(doc), encoding="utf-8")
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    print(f"[gpu_check] {len(results) - len(failed)}/{len(results)} stages ok or skipped; results in "
          f"{out / 'gpu_results.json'} and {out / 'gpu_results.md'}" + (f"; FAILED: {', '.join(failed)}" if failed
                                                                        else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
