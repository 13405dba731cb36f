"""Styled-VQ training on the shared runtime (in process): stage 1 lowers the MSE by a stated margin for v1 and v2 on
the original's JSON-list data format, stage 2 fine-tunes through a frozen codebook and resumes bit for bit, the
dump / k-means / attach steps, the token-order analysis, and the user errors of the training entry points."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from form_data import synth
from styled_vq.__main__ import main
from styled_vq.analysis import analyze
from styled_vq.train import SVQTrainConfig, attach, build_codebook, dump, export, load_model, train
from train_runtime import RuntimeConfig
from vae_train.styled import StyledVQ, StyledVQConfig
from zh_t2i_base.cli import UserError

SMALL = {"image_size": 16, "patch_size": 4, "width": 32, "heads": 2, "dense_blocks": 1, "expert_blocks": 1,
         "cond_blocks": 4, "emb_dim": 8, "decoder_width": 32, "final_blocks": 1, "refiner_channels": 8,
         "refiner_groups": 2, "refiner_kernel": 5, "codebook_size": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth16")
    synth.write_dataset(root, n_train=96, n_val=16, image_size=16, progress=False)
    rows = (root / "train_clip.csv").read_text(encoding="utf-8").splitlines()[1:]
    (root / "train.json").write_text(json.dumps([str(root / r.split("\t")[1]) for r in rows]))  # absolute paths
    return root


def metrics(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/model"] for r in rows if "loss/model" in r}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_stage1_lowers_mse(data, tmp_path, version):
    tc = SVQTrainConfig(train_data=str(data / "train.json"), val_data=str(data / "val_clip.csv"), eval_images=16)
    cfg = StyledVQConfig(**SMALL, version=version)
    before = train(cfg, tc, RuntimeConfig(out_dir=str(tmp_path / "untrained"), max_steps=1, lr=1e-9, batch_size=16,
                                          workers=0))["eval"]["mse"]
    after = train(cfg, tc, RuntimeConfig(out_dir=str(tmp_path / "run"), max_steps=100, lr=3e-3, batch_size=16,
                                         workers=0, warmup_steps=5, log_every=100))["eval"]["mse"]
    assert after < 0.4 * before, (before, after)  # stated margin: val MSE at most 40 % of the untrained model's
    assert (tmp_path / "run" / "recon_latest.png").stat().st_size > 100
    model = load_model(tmp_path / "run")
    assert model.cfg.version == version and not model.has_codebook


def test_perceptual_loss_from_local_files(data, tmp_path):
    from torchvision.models import vgg16

    from vae_train.lpips import VGG_CHANNELS

    vgg, lin = tmp_path / "vgg16.pth", tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}, vgg)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(VGG_CHANNELS)}, lin)
    tc = SVQTrainConfig(train_data=str(data / "train_clip.csv"), lpips_vgg=str(vgg), lpips_lin=str(lin),
                        perceptual_weight=0.5)
    train(StyledVQConfig(**SMALL), tc, RuntimeConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=8,
                                                     workers=0, log_every=1))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["lpips"] > 0 and row["loss/model"] == pytest.approx(row["mse"] + 0.5 * row["lpips"], rel=1e-5)
    with pytest.raises(UserError, match="LPIPS"):
        train(StyledVQConfig(**SMALL), SVQTrainConfig(train_data=str(data / "train_clip.csv"), lpips_vgg=str(vgg)),
              RuntimeConfig(out_dir=str(tmp_path / "bad"), max_steps=1, batch_size=8, workers=0))


def test_codebook_steps_stage2_and_resume(data, tmp_path):
    torch.manual_seed(0)
    export(StyledVQ(StyledVQConfig(**SMALL)), tmp_path / "stage1")
    summary = dump(str(tmp_path / "stage1"), str(data / "train_clip.csv"), str(tmp_path / "feats"), workers=0,
                   device="cpu")
    assert summary["images"] == 96 and summary["shards"] == ["features-00000-of-00001.pt"]
    feats = torch.load(tmp_path / "feats" / summary["shards"][0], weights_only=True)
    model = load_model(tmp_path / "stage1")
    from form_data.datasets import CsvImageText, default_transform

    first = CsvImageText(data / "train_clip.csv", transform=default_transform(16))[0]["image"]
    assert torch.allclose(feats["features"][0], model.encode_continuous(first[None])[0], atol=1e-6)
    cb = build_codebook(str(tmp_path / "feats"), 16, str(tmp_path / "codebook.pt"), iters=20, device="cpu")
    assert cb["vectors"] == 96 * 8 and cb["empty"] == 0
    assert attach(str(tmp_path / "stage1"), str(tmp_path / "codebook.pt"), str(tmp_path / "stage2"))[
        "codebook_size"] == 16
    centres = load_model(tmp_path / "stage2").codebook.clone()

    tc = SVQTrainConfig(stage=2, train_data=str(data / "train_clip.csv"), init_from=str(tmp_path / "stage2"))
    rc = {"max_steps": 6, "lr": 3e-3, "batch_size": 16, "workers": 0, "save_every": 3, "keep_last": 5,
          "log_every": 1}
    full = train(StyledVQConfig(), tc, RuntimeConfig(out_dir=str(tmp_path / "full"), **rc))
    assert full["step"] == 6
    tuned = load_model(tmp_path / "full")
    assert torch.equal(tuned.codebook, centres)  # frozen
    assert not torch.equal(tuned.encoder.proj.weight, model.encoder.proj.weight)  # the rest was fine-tuned
    # resume from the step-3 checkpoint in a fresh directory: the same trajectory
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "ckpt-00000003.pt", tmp_path / "resumed")
    (tmp_path / "resumed" / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[:3]))
    train(StyledVQConfig(), tc, RuntimeConfig(out_dir=str(tmp_path / "resumed"), resume="latest", **rc))
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "full")
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "resumed")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_token_order_analysis(data, tmp_path):
    torch.manual_seed(0)
    export(StyledVQ(StyledVQConfig(**SMALL)), tmp_path / "m")
    out = analyze(str(tmp_path / "m"), str(data / "val_clip.csv"), str(tmp_path / "order"), max_images=8,
                  device="cpu")
    result = json.loads((tmp_path / "order" / "token_order.json").read_text())
    assert result["images"] == 8 and result["seq_len"] == 8
    for mode in ("mean", "swap"):
        assert len(result["mse_rise"][mode]) == 8
        assert -1 <= out["summary"][mode]["spearman_position_vs_rise"] <= 1
        assert len(result["summary"][mode]["per_block"]) == 4
        assert len(result["summary"][mode]["per_slot_in_block"]) == 2
    assert any(v > 0 for v in result["mse_rise"]["swap"])  # replacing tokens changes the reconstruction
    assert (tmp_path / "order" / "token_order.png").read_bytes()[:4] == b"\x89PNG"


def test_training_user_errors(data, tmp_path):
    csv = str(data / "train_clip.csv")
    export(StyledVQ(StyledVQConfig(**SMALL)), tmp_path / "stage1")
    cases = [
        (["--preset", "huge", "--train-data", csv], "unknown --preset"),
        (["--stage", "2", "--train-data", csv], "--stage 2 needs --init-from"),
        (["--stage", "2", "--init-from", str(tmp_path / "stage1"), "--train-data", csv], "has no codebook"),
        (["--stage", "3", "--train-data", csv], "--stage must be 1 or 2"),
        (["--image-size", "18", "--patch-size", "4", "--train-data", csv], "not divisible by patch_size"),
        (["--preset", "micro8"], "--train-data is required"),
        (["kmeans", "--features", str(tmp_path), "--k", "4", "--out", str(tmp_path / "c.pt")], "no meta.json"),
    ]
    for argv, needle in cases:
        with pytest.raises(UserError, match=needle):
            main([*argv, "--out-dir", str(tmp_path / "run")] if argv[0].startswith("--") else argv)
    with pytest.raises(SystemExit, match="2"):  # a missing input is refused while the flags are parsed
        main(["attach", "--model", str(tmp_path / "stage1"), "--codebook", str(tmp_path / "none.pt"), "--out",
              str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="2"):
        main(["dump", "--model", str(tmp_path / "nope"), "--data", csv, "--out", str(tmp_path / "f")])
    bad = tmp_path / "bad.pt"
    torch.save({"centres": torch.randn(4, 3)}, bad)
    with pytest.raises(UserError, match=r"codebook must have shape \[K, 8\]"):
        attach(str(tmp_path / "stage1"), str(bad), str(tmp_path / "o"))
    assert not (tmp_path / "o" / "model.safetensors").exists()
