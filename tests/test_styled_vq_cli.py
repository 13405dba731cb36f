"""`python -m styled_vq` end to end through its CLI: stage 1, the feature dump under torchrun (one shard per rank),
k-means, attach, then `python -m vae_train tokenize` unchanged over the Styled-VQ run (and its clear error for a
stage-1 model), the token-order analysis, the import of an original checkpoint, and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, one_line_error
from form_data import synth
from form_data.datasets import CsvImageText, default_transform
from styled_vq.__main__ import main
from vae_train.load import load_image_tokenizer

SMALL = ["--image-size", "16", "--patch-size", "4", "--width", "32", "--heads", "2", "--dense-blocks", "1",
         "--expert-blocks", "1", "--cond-blocks", "4", "--emb-dim", "8", "--decoder-width", "32", "--final-blocks", "1",
         "--refiner-channels", "8", "--refiner-groups", "2", "--refiner-kernel", "5"]
FIXTURE = REPO / "tests" / "fixtures" / "styled_vq_orig"


@pytest.mark.slow
def test_pipeline_through_the_cli(tmp_path, cli, capsys):
    data = tmp_path / "data"
    synth.write_dataset(data, n_train=48, n_val=16, image_size=16, progress=False)
    train_csv, val_csv = str(data / "train_clip.csv"), str(data / "val_clip.csv")
    run1, feats, run2 = tmp_path / "run1", tmp_path / "feats", tmp_path / "run2"
    assert main([*SMALL, "--train-data", train_csv, "--max-steps", "10", "--batch-size", "8", "--workers", "0",
                 "--lr", "3e-3", "--out-dir", str(run1)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 10

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "styled_vq", "dump", "--model", str(run1), "--data", val_csv, "--out", str(feats),
                        "--workers", "0", "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((feats / "meta.json").read_text())
    assert meta["images"] == 16 and meta["world_size"] == 2 and len(meta["shards"]) == 2
    shard = torch.load(feats / meta["shards"][1], weights_only=True)
    assert shard["features"].shape == (8, 8, 8) and shard["index"].tolist() == list(range(1, 16, 2))
    model = load_image_tokenizer(run1)
    val = CsvImageText(val_csv, transform=default_transform(16))
    assert torch.allclose(shard["features"][0], model.encode_continuous(val[1]["image"][None])[0], atol=1e-5)

    assert main(["kmeans", "--features", str(feats), "--k", "16", "--out", str(tmp_path / "cb.pt")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["vectors"] == 128
    # --warm-start: k-means on a 2 x K sample first, then on all 128 vectors from its centres
    assert main(["kmeans", "--features", str(feats), "--k", "16", "--warm-start", "2", "--out",
                 str(tmp_path / "cb_warm.pt")]) == 0
    warm = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert warm["vectors"] == 128 and warm["warm_start_iterations"] >= 1 and warm["empty"] == 0
    assert main(["attach", "--model", str(run1), "--codebook", str(tmp_path / "cb.pt"), "--out", str(run2)]) == 0

    r = cli("-m", "vae_train", "tokenize", "--tokenizer", str(run2), "--data", val_csv, "--out",
            str(tmp_path / "tok.pt"), "--workers", "0")
    assert r.returncode == 0, r.stderr
    tok = torch.load(tmp_path / "tok.pt", weights_only=True)
    assert tok["tokens"].shape == (16, 8) and tok["tokenizer"]["fmap_size"] == 0
    assert tok["tokenizer"]["num_tokens"] == 16 and tok["tokenizer"]["seq_len"] == 8
    assert torch.equal(tok["tokens"][3].long(), load_image_tokenizer(run2).encode(val[3]["image"][None])[0])
    r = cli("-m", "vae_train", "tokenize", "--tokenizer", str(run1), "--data", val_csv, "--out",
            str(tmp_path / "t1.pt"), "--workers", "0")
    assert r.returncode == 2 and "no codebook yet (stage 1)" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "t1.pt").exists()

    assert main(["analyze", "--model", str(run1), "--data", val_csv, "--out", str(tmp_path / "order"),
                 "--images", "8"]) == 0
    assert (tmp_path / "order" / "token_order.png").is_file()
    assert len(json.loads((tmp_path / "order" / "token_order.json").read_text())["mse_rise"]["mean"]) == 8


def test_convert_original_checkpoint_and_cli_errors(tmp_path, cli, capsys):
    out = tmp_path / "imported"
    assert main(["convert", "--checkpoint", str(FIXTURE / "original_v1.pt"), "--version", "v1", "--codebook",
                 "embedded", "--heads", "4", "--refiner-groups", "2", "--out", str(out)]) == 0
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    model = load_image_tokenizer(out)
    assert torch.equal(model.encode(expected["images"]), expected["v1"]["indices"])
    r = cli("-m", "styled_vq", "convert", "--checkpoint", str(FIXTURE / "original_v2.pt"), "--version", "v1",
            "--heads", "4", "--refiner-groups", "2", "--out", str(tmp_path / "c"))
    assert "does not match a v1 model" in one_line_error(r)
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", str(out), "--data", str(out), "--out", str(tmp_path / "a"), "--images", "1"])
    assert e.value.code == 2 and "must be an integer >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--tokens-per-block" in capsys.readouterr().out
