"""The shared training runtime: schedules, parameter groups, checkpoints, resume, NaN stop, config flags."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from train_runtime import RuntimeConfig, Task, Trainer, TrainingDiverged
from train_runtime import checkpoint as ckpt
from train_runtime.config import add_dataclass_args, parse_configs
from train_runtime.optim import lr_factor, param_groups
from zh_t2i_base import checkpoint as ckpt_files
from zh_t2i_base.cli import UserError


class Toy(Task):
    """A small regression net with dropout (so the RNG state matters for resume)."""

    def __init__(self, nan_at: int | None = None):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.2), nn.ReLU(), nn.LayerNorm(32), nn.Linear(32, 1))
        self.nan_at = nan_at

    def modules(self):
        return {"model": self.net}

    def training_step(self, batch, step):
        x, y = batch
        loss = ((self.ddp["model"](x) - y) ** 2).mean()
        if self.nan_at is not None and step >= self.nan_at:
            loss = loss * float("nan")
        return {"model": loss}, {"x_mean": float(x.mean())}

    def meta(self):
        return {"kind": "toy"}


def toy_data(n: int = 200) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


def cfg(tmp_path, **kw) -> RuntimeConfig:
    base = {"out_dir": str(tmp_path), "max_steps": 30, "batch_size": 16, "log_every": 1, "save_every": 10,
            "workers": 0, "lr": 1e-2, "warmup_steps": 3}
    return RuntimeConfig(**{**base, **kw})


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/model"] for r in rows if "loss/model" in r}


def test_lr_schedule_warmup_cosine_constant():
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(70, 10, 100, "constant") == 1.0


def test_no_weight_decay_on_norms_biases_embeddings():
    m = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4), "norm": nn.LayerNorm(4),
                       "conv": nn.Conv2d(3, 4, 3)})
    m.register_parameter("pos_emb", nn.Parameter(torch.zeros(5, 4)))
    decay, keep = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m["lin"].weight), id(m["conv"].weight)}
    assert len(keep["params"]) == 6  # emb, lin.bias, norm.weight, norm.bias, conv.bias, pos_emb


def test_resume_continues_the_same_trajectory(tmp_path):
    full = tmp_path / "full"
    Trainer(cfg(full), Toy(), toy_data()).fit()
    part = tmp_path / "part"
    Trainer(cfg(part, max_time=1e-9), Toy(), toy_data()).fit()  # stops (and saves) after its first step
    assert [p.name for p in ckpt_files.checkpoints(part)] == ["ckpt-00000001.pt"]
    Trainer(cfg(part, resume="latest"), Toy(), toy_data()).fit()
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert a == b  # bit for bit, across the epoch boundary (200 samples / 16 = 12 batches per epoch)
    sd_a = torch.load(full / "ckpt-00000030.pt", weights_only=True)["modules"]["model"]
    sd_b = torch.load(part / "ckpt-00000030.pt", weights_only=True)["modules"]["model"]
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_resume_survives_a_torn_log_line_and_a_truncated_newest_checkpoint(tmp_path, capsys):
    """A kill mid-write leaves half a line in metrics.jsonl; a full disk leaves the newest checkpoint cut short.
    ``--resume latest`` drops the torn line, warns, resumes from the previous intact checkpoint and ends on the
    uninterrupted run's trajectory."""
    full = tmp_path / "full"
    Trainer(cfg(full), Toy(), toy_data()).fit()
    part = tmp_path / "part"
    shutil.copytree(full, part)  # the run killed after writing part of step 30's checkpoint ...
    (part / "ckpt-00000030.pt").unlink()
    newest = part / "ckpt-00000020.pt"  # ... on a disk that had cut step 20's short
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with open(part / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 21, "loss/mo')
    Trainer(cfg(part, resume="latest"), Toy(), toy_data()).fit()
    assert "resuming from the previous checkpoint ckpt-00000010.pt" in capsys.readouterr().err
    assert losses(part) == losses(full)
    with pytest.raises(UserError, match="ckpt-00000010.pt"):  # an explicitly named file must load
        (part / "ckpt-00000010.pt").write_bytes(b"cut")
        Trainer(cfg(part, resume=str(part / "ckpt-00000010.pt")), Toy(), toy_data()).fit()


def test_runtime_config_refuses_non_finite_numbers_and_absurd_learning_rates():
    for bad in ({"lr": 1e39}, {"lr": 0.0}, {"lr": float("nan")}, {"max_time": float("inf")}):
        with pytest.raises(ValueError, match="lr must be in|must be a finite number"):
            RuntimeConfig(**bad)


def test_checkpoint_contents_keep_last_and_exports(tmp_path):
    Trainer(cfg(tmp_path, keep_last=2, save_every=5, max_steps=23), Toy(), toy_data()).fit()
    assert [p.name for p in ckpt_files.checkpoints(tmp_path)] == ["ckpt-00000020.pt", "ckpt-00000023.pt"]
    state = ckpt_files.load(tmp_path / "ckpt-00000023.pt")
    assert {"step", "epoch", "batch_in_epoch", "modules", "optimizers", "schedulers", "scaler", "rng", "config",
            "meta"} <= set(state)
    assert state["step"] == 23 and state["meta"] == {"kind": "toy"}
    assert state["config"]["runtime"]["max_steps"] == 23
    assert json.loads((tmp_path / "config.json").read_text())["runtime"]["batch_size"] == 16
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "model.safetensors")) == set(state["modules"]["model"])


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    Trainer(cfg(tmp_path, max_steps=10, save_every=10), Toy(), toy_data()).fit()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is killed in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"step": 11}, tmp_path, 11)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ckpt_files.checkpoints(tmp_path)] == ["ckpt-00000010.pt"]
    assert ckpt_files.load(ckpt.resolve("latest", tmp_path))["step"] == 10
    # a temp file left by a SIGKILL (no cleanup ran) is ignored and removed on the next start
    (tmp_path / ".ckpt-zzz.tmp").write_bytes(b"garbage")
    Trainer(cfg(tmp_path, max_steps=12, resume="latest", save_every=10), Toy(), toy_data()).fit()
    assert not list(tmp_path.glob(".ckpt-*.tmp"))


def test_nan_loss_stops_with_message_and_keeps_last_good(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 7.*ckpt-00000005\.pt"):
        Trainer(cfg(tmp_path, save_every=5), Toy(nan_at=7), toy_data()).fit()
    assert [p.name for p in ckpt_files.checkpoints(tmp_path)] == ["ckpt-00000005.pt"]
    assert ckpt_files.load(tmp_path / "ckpt-00000005.pt")["step"] == 5


def test_bad_run_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--batch-size"):
        Trainer(cfg(tmp_path, batch_size=0), Toy(), toy_data())
    with pytest.raises(UserError, match="fewer than one batch"):
        Trainer(cfg(tmp_path, batch_size=500), Toy(), toy_data()).fit()
    with pytest.raises(UserError, match="fp16 needs a CUDA"):
        Trainer(cfg(tmp_path, precision="fp16"), Toy(), toy_data()).fit()
    with pytest.raises(UserError, match="no such checkpoint"):
        Trainer(cfg(tmp_path, resume=str(tmp_path / "nope.pt")), Toy(), toy_data()).fit()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        Trainer(cfg(tmp_path, resume=str(bad)), Toy(), toy_data()).fit()


def test_grad_accum_matches_bigger_batch(tmp_path):
    """Two micro-batches of 8 = one batch of 16 (no dropout, same data order): same updates up to float error."""

    class NoDrop(Toy):
        def __init__(self):
            super().__init__()
            self.net[1].p = 0.0

    Trainer(cfg(tmp_path / "a", max_steps=5, batch_size=16), NoDrop(), toy_data(), shuffle=False).fit()
    Trainer(cfg(tmp_path / "b", max_steps=5, batch_size=8, grad_accum=2), NoDrop(), toy_data(), shuffle=False).fit()
    sa = ckpt_files.load(tmp_path / "a/ckpt-00000005.pt")["modules"]["model"]
    sb = ckpt_files.load(tmp_path / "b/ckpt-00000005.pt")["modules"]["model"]
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


def test_config_flags_file_and_defaults(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_dataclass_args(p, RuntimeConfig, defaults={"lr": 5e-4})
    help_text = p.format_help()
    assert "--batch-size" in help_text and "--batch_size" in help_text and "(default: 0.0005)" in help_text
    conf = tmp_path / "c.yaml"
    conf.write_text("batch_size: 7\nlr: 0.1\nschedule: constant\n")
    _, (rc,) = parse_configs(p, ["--config", str(conf), "--lr", "0.2"], RuntimeConfig, defaults={"lr": 5e-4})
    assert (rc.batch_size, rc.lr, rc.schedule, rc.max_steps) == (7, 0.2, "constant", 1000)
    _, (rc,) = parse_configs(p, ["--max_steps", "9"], RuntimeConfig, defaults={"lr": 5e-4})
    assert rc.max_steps == 9 and math.isclose(rc.lr, 5e-4)
    conf.write_text("bogus_option: 1\n")
    with pytest.raises(UserError, match="bogus_option"):
        parse_configs(p, ["--config", str(conf)], RuntimeConfig)


def test_channels_last_gives_the_same_training(tmp_path):
    class Conv(Task):
        def __init__(self):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

        def modules(self):
            return {"model": self.net}

        def training_step(self, batch, step):
            (x,) = batch
            return {"model": (self.ddp["model"](x) - x.flip(-1)).pow(2).mean()}, {}

    data = TensorDataset(torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(2)))
    for fmt in ("nchw", "nhwc"):
        Trainer(cfg(tmp_path / fmt, max_steps=4, batch_size=8, channels_last=fmt == "nhwc"), Conv(), data).fit()
    a, b = losses(tmp_path / "nchw"), losses(tmp_path / "nhwc")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_every_weights_file_reader_gives_one_line_errors(tmp_path):
    """Checkpoints, judges and codebooks all go through zh_t2i_base.fileio.load_torch (weights_only=True)."""
    from styled_vq.kmeans import load_centres
    from zh_t2i_demo.judge import Judge

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    for load, what in ((ckpt_files.load, "checkpoint"), (Judge.load, "judge"), (load_centres, "codebook file")):
        with pytest.raises(UserError, match=rf"bad\.pt: not a loadable {what} \("):
            load(bad)
        with pytest.raises(UserError, match=f"{what} not found: "):
            load(tmp_path / "missing.pt")


def test_fold_batchnorm_keeps_outputs_and_refuses_wrong_pairings():
    """zh_t2i_base.precision.fold_batchnorm: conv + BN (plain, and timm's BN + activation) fold into one conv with the
    same outputs; a BN that does not normalise its conv's output, or a module in training mode, is left alone."""
    from timm.layers import BatchNormAct2d

    from zh_t2i_base.precision import fold_batchnorm

    class Block(torch.nn.Module):
        def __init__(self, wrong: bool = False):
            super().__init__()
            self.wrong = wrong
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = BatchNormAct2d(8, act_layer=torch.nn.SiLU)
            self.conv2 = torch.nn.Conv2d(8, 8, 1, bias=False, groups=2)
            self.bn2 = torch.nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            y = self.bn(torch.relu(y) if self.wrong else y)
            return self.bn2(self.conv2(y))

    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12)
    for wrong in (False, True):
        m = Block(wrong)
        for bn in (m.bn, m.bn2):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.3, 3)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.3)
        assert fold_batchnorm(m, lambda mod: mod(x)) is m  # training mode: untouched
        m.eval()
        folded = fold_batchnorm(m, lambda mod: mod(x))
        if wrong:
            assert folded is m
            continue
        assert folded is not m and not any(isinstance(b, torch.nn.BatchNorm2d) for b in folded.modules())
        assert sum(isinstance(b, torch.nn.BatchNorm2d) for b in m.modules()) == 2  # the original is kept as it was
        with torch.no_grad():
            torch.testing.assert_close(folded(x), m(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(folded(x + 1), m(x + 1), atol=1e-5, rtol=1e-5)


def test_cpu_bf16_training_and_the_precision_chooser(tmp_path, monkeypatch):
    """bf16 autocast trains on CPU (the loss falls like fp32's); the chooser asks oneDNN and says fp32 without it."""
    from zh_t2i_base import precision as tr

    Trainer(cfg(tmp_path / "a"), Toy(), toy_data()).fit()
    Trainer(cfg(tmp_path / "b", precision="bf16"), Toy(), toy_data()).fit()
    fp32, bf16 = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert bf16[30] < 0.5 * bf16[1] and abs(bf16[30] - fp32[30]) < 0.25 * fp32[1]
    assert bf16[1] != fp32[1]  # autocast really ran in bf16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert tr.cpu_training_precision() == "fp32"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert tr.cpu_training_precision() == "bf16"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert tr.cpu_training_precision() == "fp32"


class Augmented(torch.utils.data.Dataset):
    """toy_data with a random "augmentation" drawn from the global torch, numpy and python RNGs, as torchvision's
    random crops and flips draw theirs."""

    def __init__(self):
        self.base = toy_data()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.base[i]
        return x + 0.1 * torch.randn(8) + 0.01 * float(np.random.rand()) + 0.01 * random.random(), y


def test_resume_mid_epoch_with_workers_and_random_augmentation_matches_the_uninterrupted_run(tmp_path):
    """Each item's random draws depend on (seed, epoch, index) alone, not on which worker reads it or where the
    epoch began: a run stopped after its first step and resumed with 2 workers retraces the uninterrupted one."""
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(cfg(full, workers=2, max_steps=16), Toy(), Augmented()).fit()
    Trainer(cfg(part, workers=2, max_steps=16, max_time=1e-9), Toy(), Augmented()).fit()  # stops mid-epoch
    Trainer(cfg(part, workers=2, max_steps=16, resume="latest"), Toy(), Augmented()).fit()
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 17))  # across the epoch boundary (12 batches an epoch)
    assert a == b
    # and the draws do not depend on the number of workers either
    Trainer(cfg(tmp_path / "serial", workers=0, max_steps=16), Toy(), Augmented()).fit()
    assert losses(tmp_path / "serial") == a


def test_config_file_values_pass_the_checks_of_their_flags(tmp_path):
    """A --config value is converted and checked as its flag would be (type, range, finiteness, path), with the
    option's name in the one-line error; YAML's string "1e-3" is a number, as on the command line."""
    from dataclasses import dataclass

    from train_runtime.config import parse_configs, path_field, training_parser
    from zh_t2i_base.cli import PathArg

    @dataclass
    class Model:
        width: int = 8
        scale: float = 1.0
        tied: bool = False
        sizes: tuple[int, ...] = (1, 2)
        data: str = path_field(PathArg("in", "file"))

    (tmp_path / "d.csv").write_text("x\n")
    good = tmp_path / "good.yaml"
    good.write_text(f"width: 16\nscale: 1e-3\nlr: '2e-4'\ntied: true\nsizes: [3, 4]\ndata: {tmp_path / 'd.csv'}\n"
                    f"out_dir: {tmp_path / 'run'}\n")
    parser = training_parser("prog", "", Model, {})
    _, (m, rc) = parse_configs(parser, ["--config", str(good), "--width", "32"], Model, RuntimeConfig)
    assert (m.width, m.scale, m.tied, m.sizes, rc.lr) == (32, 1e-3, True, (3, 4), 2e-4)  # the flag beats the file
    (tmp_path / "f").write_text("x")
    for text, message in [("width: abc", "option 'width': expected an integer, got 'abc'"),
                          ("width: 2.5", "option 'width': expected an integer, got 2.5"),
                          ("scale: .nan", "option 'scale': must be a finite number"),
                          ("tied: 'yes'", "option 'tied': expected true or false"),
                          ("sizes: [1, x]", "option 'sizes': expected an integer, got 'x'"),
                          ("width: [1, 2]", "option 'width': expected"),
                          (f"data: {tmp_path / 'nope.csv'}", "option 'data': not found"),
                          (f"out_dir: {tmp_path / 'f' / 'run'}", "option 'out_dir': cannot write"),
                          ("lr: 1e39", "bad RuntimeConfig options: lr must be in")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        with pytest.raises(UserError, match=re.escape(message)):
            parse_configs(parser, ["--config", str(bad)], Model, RuntimeConfig)
