"""Issue 17 (parts 4 and 6): a trainer started with a bad input writes nothing; an image folder trains a CLIP (or is
refused for lack of captions); resuming a checkpoint of other model sizes names the flags that differ; fp16 on a CPU
is refused alike by trainers and inference commands; ports are range-checked."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_line_error
from form_data import synth
from zh_t2i_base.cli import int_in

FP16_ON_CPU = "--precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)"
VAE = ["--model", "dvae", "--image-size", "16", "--num-layers", "2", "--hidden-dim", "8", "--num-resnet-blocks", "0",
       "--num-tokens", "64", "--emb-dim", "8", "--batch-size", "8", "--workers", "0", "--device", "cpu",
       "--max-steps", "1"]
CLIP = ["--model", "zh-tiny", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--max-steps", "1"]
STYLED_VQ = ["--image-size", "16", "--patch-size", "4", "--width", "32", "--heads", "2", "--dense-blocks", "1",
             "--expert-blocks", "1", "--cond-blocks", "4", "--emb-dim", "8", "--decoder-width", "32",
             "--final-blocks", "1", "--refiner-channels", "8", "--refiner-groups", "2", "--refiner-kernel", "5",
             "--batch-size", "8", "--workers", "0", "--device", "cpu", "--max-steps", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth16")
    synth.write_dataset(root, n_train=16, n_val=8, image_size=16, progress=False)
    return root


def test_clip_trains_on_an_image_folder_and_refuses_one_without_captions(data, tmp_path, cli_fast):
    folder = tmp_path / "images.csv"  # a folder whose name ends in .csv once got the CSV options: a TypeError
    shutil.copytree(data / "train", folder)
    run = tmp_path / "run"
    r = cli_fast("-m", "clip_train", *CLIP, "--train-data", str(folder), "--out-dir", str(run))
    assert r.returncode == 0, r.stderr
    assert (run / "open_clip_config.json").is_file() and (run / "vocab.txt").is_file()

    bare = tmp_path / "bare"
    bare.mkdir()
    for png in sorted((data / "train").rglob("*.png")):
        shutil.copy(png, bare / png.name)
    line = one_line_error(cli_fast("-m", "clip_train", *CLIP, "--train-data", str(bare), "--out-dir",
                                   str(tmp_path / "bare_run")))
    assert "has a caption" in line and "<stem>.txt" in line
    assert not (tmp_path / "bare_run").exists()


def test_resume_with_other_model_sizes_names_the_flags_that_differ(data, tmp_path, cli_fast):
    run = tmp_path / "run"
    args = [*VAE, "--train-data", str(data / "train_clip.csv"), "--out-dir", str(run)]
    assert cli_fast("-m", "vae_train", *args).returncode == 0
    again = [*args[:args.index("--num-tokens")], "--num-tokens", "32", *args[args.index("--num-tokens") + 2:]]
    line = one_line_error(cli_fast("-m", "vae_train", *again, "--hidden-dim", "16", "--resume", "latest",
                                   "--max-steps", "2"))
    assert "--num-tokens 32 here, 64 in the checkpoint" in line and "--hidden-dim 16 here, 8 in the checkpoint" in line
    assert "size mismatch" not in line
    # the same options resume (a changed runtime option such as --max-steps is not a model change)
    assert cli_fast("-m", "vae_train", *args, "--resume", "latest", "--max-steps", "2").returncode == 0


def bad_starts(data: Path) -> list[tuple[str, list[str], str]]:
    csv = str(data / "train_clip.csv")
    return [
        ("vae_train", [*VAE, "--train-data", csv, "--precision", "fp16"], FP16_ON_CPU),
        ("vae_train", [*VAE, "--train-data", csv, "--batch-size", "1000"], "fewer than one batch"),
        ("vae_train", [*VAE, "--train-data", csv, "--resume", str(data / "train_clip.csv")], "train_clip.csv"),
        ("clip_train", [*CLIP, "--train-data", csv, "--model", "no-such-model"], "no-such-model"),
        ("clip_train", [*CLIP, "--train-data", csv, "--precision", "fp16"], FP16_ON_CPU),
        ("clip_train", [*CLIP, "--train-data", csv, "--batch-size", "1000"], "fewer than one batch"),
        ("clip_train", [*CLIP, "--train-data", csv, "--csv-caption-key", "nope"], "nope"),
        ("dalle_train", ["--train-data", csv, "--device", "cpu"], "--image-tokenizer"),
        ("styled_vq", [*STYLED_VQ, "--train-data", csv, "--precision", "fp16"], FP16_ON_CPU),
        ("styled_vq", [*STYLED_VQ, "--train-data", csv, "--batch-size", "1000"], "fewer than one batch"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_a_bad_start_writes_nothing_into_the_run_directory(data, tmp_path, cli_fast, case):
    """Every check runs before the run directory gets anything: a fresh --out-dir stays absent, an existing one
    holds nothing new."""
    package, args, message = bad_starts(data)[case]
    fresh = tmp_path / "fresh" / "run"
    assert message in one_line_error(cli_fast("-m", package, *args, "--out-dir", str(fresh)))
    assert not fresh.exists() and not fresh.parent.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    assert message in one_line_error(cli_fast("-m", package, *args, "--out-dir", str(old)))
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]


def test_fp16_on_a_cpu_is_refused_alike_by_trainers_and_inference(data, tmp_path, cli_fast):
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(gen / f"{i}.png")
    for scorer in ("clip:runs/none", "cnclip:ViT-B-16:none.pt", "brivl:none.yml:none.pth"):
        line = one_line_error(cli_fast("clip_sort.py", "红色圆形", "2", str(gen), "--scorer", scorer, "--device", "cpu",
                                       "--precision", "fp16"))
        assert line.endswith(f"error: {FP16_ON_CPU}"), line
    assert sorted(p.name for p in gen.iterdir()) == ["0.png", "1.png"]

    from test_brivl import TINY_CFG

    checkpoint = tmp_path / "w.pth"
    checkpoint.write_bytes(b"never read")
    feats = tmp_path / "feats"
    line = one_line_error(cli_fast("-m", "brivl_infer.extract", "--cfg", str(TINY_CFG), "--checkpoint", str(checkpoint),
                                   "--features", str(feats), "--device", "cpu", "--precision", "fp16"))
    assert line.endswith(f"error: {FP16_ON_CPU}"), line
    assert not feats.exists()
    line = one_line_error(cli_fast("-m", "vae_train", *VAE, "--train-data", str(data / "train_clip.csv"),
                                   "--out-dir", str(tmp_path / "run"), "--precision", "fp16"))
    assert line.endswith(f"error: {FP16_ON_CPU}"), line


def test_port_must_be_a_tcp_port(tmp_path, cli_fast):
    for bad in ("99999", "65536", "-1"):
        line = one_line_error(cli_fast("-m", "form_data", "serve", str(tmp_path), "--port", bad))
        assert f"must be an integer in [0, 65535], got {bad}" in line
    parse = int_in(0, 65535)
    assert parse("0") == 0 and parse("65535") == 65535
    with pytest.raises(argparse.ArgumentTypeError):
        parse("65536")
    with pytest.raises(ValueError):
        parse("http")
