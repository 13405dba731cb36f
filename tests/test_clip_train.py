"""clip_train: training lifts recall, torchrun (2 CPU processes, gathered loss), the checkpoint round trip through
open_clip, the HF text tower from a local directory, the metrics, the eval CLI, flags and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_train.eval import attribute_matches, evaluate_checkpoint, open_pairs, retrieval_metrics
from clip_train.load import load_clip, register_checkpoint
from clip_train.model import normalize
from clip_train.train import ClipConfig, InMemory, epoch_schedule, steps_per_epoch, train
from conftest import REPO, one_line_error
from form_data import synth
from form_data.tokenizer import build_vocab, read_captions
from train_runtime import RuntimeConfig
from zh_t2i_base.cli import UserError
from zh_t2i_rerank.registry import make_scorer

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth32")
    synth.write_dataset(root, n_train=512, n_val=96, image_size=SIZE, progress=False)
    build_vocab(read_captions(root / "train_clip.csv"), root / "vocab.txt")
    return root


def clip_config(data: Path, **kw) -> ClipConfig:
    return ClipConfig(**{"model": "zh-tiny", "image_size": SIZE, "vocab": str(data / "vocab.txt"),
                         "train_data": str(data / "train_clip.csv"), "val_data": str(data / "val_clip.csv"),
                         "val_attributes": str(data / "attributes.jsonl"), **kw})


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    """The same tiny model untrained (one step at a negligible lr) and trained for 150 steps."""
    out = tmp_path_factory.mktemp("runs")
    cc = clip_config(data, cache_images=True)
    untrained = train(cc, RuntimeConfig(out_dir=str(out / "untrained"), max_steps=1, lr=1e-9, batch_size=64,
                                        workers=0))
    trained = train(cc, RuntimeConfig(out_dir=str(out / "trained"), max_steps=150, lr=5e-3, batch_size=64, workers=0,
                                      warmup_steps=15, weight_decay=0.1, beta2=0.98, log_every=25, save_every=75))
    return {"untrained": untrained, "trained": trained, "dir": out / "trained"}


@pytest.mark.slow
def test_training_lifts_recall_by_a_stated_margin(runs):
    before, after = runs["untrained"]["eval"], runs["trained"]["eval"]
    # stated margin: +30 points of attribute-level R@1 in both directions, and strict mean recall up too
    assert after["i2t_attr_R@1"] > before["i2t_attr_R@1"] + 30, (before, after)
    assert after["t2i_attr_R@1"] > before["t2i_attr_R@1"] + 30, (before, after)
    assert after["i2t_mean_recall"] > before["i2t_mean_recall"] + 10
    assert after["val_loss"] < before["val_loss"]
    rows = [json.loads(x) for x in (runs["dir"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/t2i_attr_R@1" in r]
    assert evals and evals[-1]["step"] == 150 and "eval/val_loss" in evals[-1]
    assert all(r["logit_scale"] <= 100.0 for r in rows if "logit_scale" in r)


@pytest.mark.slow
def test_clip_scorer_ranks_the_matching_image_first(runs, data):
    rows = [r for r in synth.iter_attributes(data / "attributes.jsonl") if r["split"] == "val"]
    scorer = make_scorer(f"clip:{runs['dir']}", device="cpu", batch_size=4)
    wins = 0
    pairs = 0
    for row in rows[:24]:
        other = next(r for r in rows if r["colour"] != row["colour"] and r["shape"] != row["shape"])
        images = [Image.open(data / r["filepath"]).convert("RGB") for r in (row, other)]
        scores = scorer.score(row["caption"], images)
        assert scores.shape == (2,) and np.isfinite(scores).all()
        wins += int(scores[0] > scores[1])
        pairs += 1
    assert wins >= 0.9 * pairs, f"{wins}/{pairs}"


@pytest.mark.slow
def test_batched_scores_equal_one_by_one(runs, data):
    paths = sorted((data / "val" / "00000").glob("*.png"))[:7]
    images = [Image.open(p).convert("RGB") for p in paths]
    batched = make_scorer(f"clip:{runs['dir']}", device="cpu", batch_size=3).score("小蓝色星形", images)
    single = make_scorer(f"clip:{runs['dir']}", device="cpu", batch_size=1).score("小蓝色星形", images)
    assert batched.shape == (7,)
    np.testing.assert_allclose(batched, single, atol=1e-5)


@pytest.mark.slow
def test_scorer_fast_tower_gives_the_plain_models_scores(runs, data):
    """The scorer folds the ResNet's BatchNorms into its convs and runs channels-last in CPU micro-batches: same
    scores as open_clip's model as loaded, one image at a time; bf16 autocast moves them only a little."""
    from form_data.datasets import default_transform
    from zh_t2i_rerank.scorer import fast_image_tower

    paths = sorted((data / "val" / "00000").glob("*.png"))[:11]
    images = [Image.open(p).convert("RGB") for p in paths]
    plain = load_clip(runs["dir"])
    model, prep = plain.model, default_transform(plain.image_size)
    with torch.no_grad():
        ids = plain.tokenizer.encode(["小蓝色星形"], plain.context_length)
        t = torch.nn.functional.normalize(model.encode_text(ids))
        want = np.array([float(torch.nn.functional.normalize(
            model.encode_image(normalize(model, prep(img)[None]))) @ t[0]) for img in images])
    tower = fast_image_tower(model.visual, plain.image_size, torch.device("cpu"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
    scorer = make_scorer(f"clip:{runs['dir']}", device="cpu", batch_size=32)
    np.testing.assert_allclose(scorer.score("小蓝色星形", images), want, atol=1e-5)
    bf16 = make_scorer(f"clip:{runs['dir']}", device="cpu", precision="bf16").score("小蓝色星形", images)
    assert np.abs(bf16 - want).max() < 0.05
    with pytest.raises(UserError, match="--precision"):
        make_scorer(f"clip:{runs['dir']}", device="cpu", precision="int8")


@pytest.mark.slow
def test_checkpoint_round_trip_through_open_clip(runs):
    run_dir = runs["dir"]
    ours = load_clip(run_dir)
    x = torch.rand(3, 3, SIZE, SIZE)
    text = ours.tokenizer.encode(["大红色圆形", "黑底小绿色三角形"], ours.context_length)
    with torch.no_grad():
        want_img, want_txt = ours.model.encode_image(normalize(ours.model, x)), ours.model.encode_text(text)
        name = register_checkpoint(run_dir / "ckpt-00000150.pt")
        weights = str(run_dir / "model.safetensors")
        by_name, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
        local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run_dir}")
        from_ckpt = load_clip(run_dir / "ckpt-00000150.pt").model
        for model in (by_name.eval(), local.eval(), from_ckpt):
            torch.testing.assert_close(model.encode_image(normalize(model, x)), want_img)
            torch.testing.assert_close(model.encode_text(text), want_txt)
    assert preprocess.transforms[0].size == SIZE
    # the middle checkpoint holds other weights than the end
    mid = load_clip(run_dir / "ckpt-00000075.pt").model
    with torch.no_grad():
        assert not torch.allclose(mid.encode_text(text), want_txt)


@pytest.mark.slow
def test_eval_command_reproduces_the_final_evaluation(runs, data, tmp_path, capsys):
    from clip_train.__main__ import main

    labels = tmp_path / "colours.txt"
    labels.write_text("\n".join(synth.COLOURS) + "\n", encoding="utf-8")
    assert main(["eval", "--checkpoint", str(runs["dir"]), "--data", str(data / "val_clip.csv"),
                 "--attributes", str(data / "attributes.jsonl"), "--zeroshot-labels", str(labels),
                 "--zeroshot-template", "{}色", "--workers", "0", "--device", "cpu", "--out",
                 str(tmp_path / "m.json")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "m.json").read_text()) == got
    final = runs["trained"]["eval"]
    for key in ("i2t_R@1", "t2i_attr_R@1", "i2t_attr_mean_recall", "t2i_median_rank", "val_loss"):
        assert got[key] == pytest.approx(final[key], abs=1e-5)
    assert got["zeroshot_n"] == 96  # every synthetic caption names one of the eight colours
    assert got["zeroshot_top1"] > 100 / 8 + 30  # colour from the prompt "红色" etc., far above chance


def test_retrieval_metrics_on_known_rankings():
    eye = torch.eye(4)
    m = retrieval_metrics(eye, eye)
    assert m["i2t_R@1"] == m["t2i_R@1"] == 100.0 and m["i2t_median_rank"] == 1.0
    shifted = torch.roll(eye, 1, dims=0)  # image i is closest to caption i-1; caption i ranks second for it
    text = eye.clone()
    m = retrieval_metrics(shifted + 0.5 * eye, text)
    assert m["i2t_R@1"] == 0.0 and m["i2t_R@5"] == 100.0 and m["i2t_median_rank"] == 2.0
    assert m["i2t_mean_recall"] == pytest.approx(200 / 3)
    # attribute level: caption 1 states the same attributes as caption 0, so retrieving it for image 0 counts
    imgs = [{"colour": "红", "shape": "圆形"}, {"colour": "红", "shape": "圆形"}, {"colour": "蓝", "shape": "星形"}]
    caps = [{"colour": "红", "shape": "圆形"}, {"colour": "红", "shape": None}, {"colour": "蓝", "shape": "星形"}]
    img_f = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    txt_f = torch.tensor([[0.1, 1.0], [0.0, 1.0], [1.0, 0.0]])
    m = retrieval_metrics(img_f, txt_f, imgs, caps)
    assert m["i2t_R@1"] < 100.0 and m["i2t_attr_R@1"] == 100.0
    match = attribute_matches(imgs, caps)
    assert match.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_epochs_and_the_seed_flags(data):
    from clip_train.__main__ import RUNTIME_DEFAULTS, train_parser
    from train_runtime.config import parse_configs

    argv = ["--train-data", str(data / "train_clip.csv"), "--batch-size", "64", "--lr", "1e-4", "--wd", "0.1",
            "--epochs", "3", "--warmup", "7", "--workers", "0", "--model", "RN50", "--save-frequency", "2",
            "--val-frequency", "1", "--csv-img-key", "filepath", "--csv-caption-key", "title", "--report-to", "none"]
    _, (cc, rc) = parse_configs(train_parser(), argv, ClipConfig, RuntimeConfig, defaults=RUNTIME_DEFAULTS)
    assert (cc.model, cc.epochs, rc.weight_decay, rc.warmup_steps, rc.lr) == ("RN50", 3, 0.1, 7, 1e-4)
    rc = epoch_schedule(cc, rc, 1000, world_size=2)
    per_epoch = steps_per_epoch(1000, rc, 2)
    assert per_epoch == 7  # 500 samples per rank // 64
    assert (rc.max_steps, rc.save_every, rc.eval_every) == (21, 14, 7)
    with pytest.raises(UserError, match="no full optimizer step"):
        epoch_schedule(cc, rc, 100, world_size=2)


def test_in_memory_images_are_bit_identical_and_skips_count_once(data, tmp_path):
    lines = (data / "train_clip.csv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train").symlink_to(data / "train")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "list.csv").write_text("\n".join([lines[0], "坏图\tbroken.png", *lines[1:4]]) + "\n", encoding="utf-8")
    base = open_pairs(str(tmp_path / "list.csv"), SIZE)
    cached = InMemory(base)
    first, again = cached[0], cached[0]
    assert first["skipped"] == 1 and again["skipped"] == 0  # the broken file falls through to the next image
    assert torch.equal(first["image"], again["image"]) and torch.equal(again["image"], base[0]["image"])
    assert again["caption"] == base[0]["caption"] and again["index"] == 1
    with pytest.raises(UserError, match="--cache-images needs --workers 0"):
        train(clip_config(data, cache_images=True), RuntimeConfig(out_dir=str(tmp_path / "run"), workers=2))


def test_eval_leaves_a_broken_row_out_of_both_sides(data, tmp_path, cli_fast):
    """Image i pairs with caption i: a row whose image is broken is dropped whole (never the next image paired with
    this caption), counted and named; a listing with no readable image is one line, exit 2."""
    run = tmp_path / "run"
    train(clip_config(data, val_data="", val_attributes=""),
          RuntimeConfig(out_dir=str(run), max_steps=1, lr=1e-3, batch_size=32, workers=0))
    lines = (data / "val_clip.csv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "val").symlink_to(data / "val")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("这不是图片\n", encoding="utf-8")
    (tmp_path / "cut.png").write_bytes((data / lines[1].split("\t")[1]).read_bytes()[:40])
    bad = ["坏图\tempty.png", "坏图\ttext.png", "坏图\tcut.png"]
    listings = {"mixed": [lines[1], bad[0], *lines[2:4], bad[1], *lines[4:9], bad[2]], "clean": lines[1:9],
                "broken": bad}
    for name, rows in listings.items():
        (tmp_path / f"{name}.csv").write_text("\n".join([lines[0], *rows]) + "\n", encoding="utf-8")

    def evaluate(name: str, workers: str) -> tuple[dict, str]:
        r = cli_fast("-m", "clip_train", "eval", "--checkpoint", str(run), "--data", str(tmp_path / f"{name}.csv"),
                     "--workers", workers, "--device", "cpu")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr

    got, err = evaluate("mixed", "1")
    want, _ = evaluate("clean", "0")
    assert got["num_samples"] == want["num_samples"] == 8 and got["skipped"] == 3 and want["skipped"] == 0
    assert [Path(p).name for p in got["skipped_paths"]] == ["empty.png", "text.png", "cut.png"]
    assert "skipped 3 unreadable image(s)" in err and "other 8 pairs" in err
    for key in ("val_loss", "i2t_R@1", "t2i_R@5", "i2t_mean_rank", "t2i_median_rank"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    line = one_line_error(cli_fast("-m", "clip_train", "eval", "--checkpoint", str(run), "--data",
                                   str(tmp_path / "broken.csv"), "--workers", "1", "--device", "cpu"))
    assert "no readable image among its 3 listed files" in line


def test_hf_text_tower_from_a_local_directory(data, tmp_path):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "tiny-bert"
    vocab = (data / "vocab.txt").read_text(encoding="utf-8").splitlines()
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=0)).save_pretrained(bert)
    shutil.copy(data / "vocab.txt", bert / "vocab.txt")
    cc = clip_config(data, text_model=str(bert), vocab="", val_attributes="")
    result = train(cc, RuntimeConfig(out_dir=str(tmp_path / "run"), max_steps=3, lr=1e-3, batch_size=32, workers=0))
    assert np.isfinite(result["train"]["loss/model"])
    shutil.rmtree(bert)  # the checkpoint alone rebuilds the tower
    loaded = load_clip(tmp_path / "run")
    assert loaded.meta["model_cfg"]["text_cfg"]["hf_model_name"] == str(bert)
    assert loaded.context_length == 32
    scores = make_scorer(f"clip:{tmp_path / 'run'}", device="cpu").score("大红色圆形", [Image.new("RGB", (40, 40))] * 2)
    assert scores.shape == (2,) and np.isfinite(scores).all()


@pytest.mark.slow
def test_torchrun_two_processes_with_gathered_loss(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--model", "zh-tiny", "--image-size", "32", "--vocab", str(data / "vocab.txt"),
            "--train-data", str(data / "train_clip.csv"), "--val-data", str(data / "val_clip.csv"),
            "--batch-size", "16", "--max-steps", "4", "--workers", "0", "--log-every", "2",
            "--local-loss", "--gather-with-grad", "--out-dir", str(tmp_path)]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "clip_train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["rank_param_max_diff"] == 0.0
    assert result["eval"]["num_samples"] == 96 and np.isfinite(result["train"]["loss/model"])


@pytest.mark.slow
def test_cli_error_is_one_line(data, tmp_path, cli):
    r = cli("-m", "clip_train", "--train-data", str(data / "train_clip.csv"), "--vocab", str(data / "vocab.txt"),
            "--model", "NoSuchNet", "--out-dir", str(tmp_path / "run"))
    assert "unknown --model 'NoSuchNet'" in one_line_error(r)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--csv-separator", ";;"], "--csv-separator must be one character"),
    (["--val-attributes", "nowhere.jsonl"], "--val-attributes/--val_attributes: not found: nowhere.jsonl"),
    (["--zeroshot-template", "一张图片"], "--zeroshot-template must contain {}"),
    (["--text-model", "hfl/chinese-roberta-wwm-ext"], "not a local directory"),
])
def test_bad_options_raise_user_errors_before_any_output(data, tmp_path, extra, message, cli_fast):
    r = cli_fast("-m", "clip_train", "--train-data", str(data / "train_clip.csv"), "--val-data",
                 str(data / "val_clip.csv"), "--vocab", str(data / "vocab.txt"), "--out-dir", str(tmp_path / "run"),
                 *extra)
    assert message in one_line_error(r)
    assert not (tmp_path / "run").exists()


def test_missing_train_data_and_bad_checkpoints(data, tmp_path):
    with pytest.raises(UserError, match="--train-data is required"):
        train(ClipConfig(), RuntimeConfig(out_dir=str(tmp_path)))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_clip(bad)
    with pytest.raises(UserError, match=r"no CLIP checkpoint in it \(ckpt-\*\.pt or model\.safetensors\)"):
        load_clip(tmp_path)
    with pytest.raises(UserError, match="no attributes for"):
        train(clip_config(data, val_attributes=str(_other_attributes(tmp_path))),
              RuntimeConfig(out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        evaluate_checkpoint(str(bad), str(data / "val_clip.csv"), device="cpu")


def _other_attributes(tmp_path: Path) -> Path:
    path = tmp_path / "attributes.jsonl"
    path.write_text(json.dumps({"filepath": "val/00000/elsewhere.png", "colour": "红"}) + "\n", encoding="utf-8")
    return path
