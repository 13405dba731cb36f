"""brivl_infer CLIs (extract, evaluate, scripts/evaluate_brivl.sh) and the reranking scorer, on the tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_brivl import TINY, TINY_CFG, tiny_checkpoint_state

from brivl_infer import evaluate, extract
from brivl_infer.load import build_model, read_config, resolve_encoder
from conftest import REPO, one_line_error
from zh_t2i_base.cli import UserError
from zh_t2i_base.retrieval import ranks
from zh_t2i_rerank.brivl import make_scorer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The parity weights in the original file layout ({'learnable': ...} with _mom copies and position_ids)."""
    cfg, _ = read_config(TINY_CFG)
    cfg.bert, _ = resolve_encoder(cfg.encoder, TINY)
    path = tmp_path_factory.mktemp("brivl") / "tiny.pth"
    torch.save({"learnable": tiny_checkpoint_state(build_model(cfg))}, path)
    return path


@pytest.mark.slow
def test_evaluate_script_end_to_end(checkpoint, tmp_path):
    """extract (jsonl from the cfg's DATASET.JSONPATH) + evaluate, chained by the script like the seed's test_xyb.sh;
    the features are the original code's (parity fixture) and the recalls those of the printed table."""
    feats = tmp_path / "feats"
    result = subprocess.run(
        ["bash", str(REPO / "scripts/evaluate_brivl.sh"), str(TINY_CFG), str(checkpoint), str(feats),
         "--image-root", str(TINY), "--batch-size", "3", "--device", "cpu", "--workers", "0"],
        cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600,
        check=False)
    assert result.returncode == 0, result.stderr
    ref = np.load(TINY / "parity.npz")
    img, text = np.load(feats / "np_img.npy"), np.load(feats / "np_text.npy")
    assert img.dtype == np.float32 and img.shape == text.shape == (4, 1280)
    assert np.abs(img - ref["np_img"]).max() < 1e-5 and np.abs(text - ref["np_text"]).max() < 1e-5
    want = evaluate.recalls(ref["np_img"].astype(np.float64), ref["np_text"].astype(np.float64))
    written = json.loads((feats / "recall.json").read_text())
    assert written["n"] == 4 and written["mean_recall"] == pytest.approx(want["mean_recall"])
    assert written["i2t"] == pytest.approx(want["i2t"]) and written["t2i"] == pytest.approx(want["t2i"])
    line = next(x for x in result.stdout.splitlines() if x.startswith("image->text"))
    assert f"R@1 {want['i2t']['R@1']:6.2f}%" in line
    assert f"mean recall {want['mean_recall']:.2f}%" in result.stdout


@pytest.mark.slow
def test_extract_errors(cli, checkpoint, tmp_path):
    """Bad inputs stop before any output exists: one line, exit 2."""
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(json.dumps({"image_id": "images/missing.png", "sentences": [["sur_text", "猫"]], "bbox": []}))
    feats = tmp_path / "feats"
    line = one_line_error(cli("-m", "brivl_infer.extract", "--cfg", str(TINY_CFG), "--checkpoint", str(checkpoint),
                              "--jsonl", str(jsonl), "--features", str(feats), "--image-root", str(TINY)))
    assert "sample 1: image not found" in line and not (feats / "np_img.npy").exists()

    def run(row: dict) -> str:
        jsonl.write_text(json.dumps(row, ensure_ascii=False) + "\n")
        with pytest.raises(UserError) as e:
            extract.main(["--cfg", str(TINY_CFG), "--checkpoint", str(checkpoint), "--jsonl", str(jsonl),
                          "--features", str(feats), "--image-root", str(TINY)])
        return str(e.value)

    good = {"image_id": "images/a.png", "sentences": [["sur_text", "猫"]], "bbox": []}
    assert "no [\"sur_text\", text] pair" in run({**good, "sentences": [["alt_text", "猫"]]})
    assert "'bbox' must be a list of [x1, y1, x2, y2]" in run({**good, "bbox": [[1, 2, 3]]})
    assert "string 'image_id'" in run({"sentences": good["sentences"]})
    with pytest.raises(SystemExit, match="2"):  # a missing file is refused while the flags are parsed
        extract.main(["--cfg", str(TINY_CFG), "--checkpoint", str(tmp_path / "none.pth"), "--features", str(feats),
                      "--image-root", str(TINY)])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    jsonl.write_text(json.dumps({**good, "image_id": str(tmp_path / "broken.png")}))
    with pytest.raises(UserError, match="cannot read image .*broken.png"):  # met in a loader worker
        extract.main(["--cfg", str(TINY_CFG), "--checkpoint", str(checkpoint), "--jsonl", str(jsonl),
                      "--features", str(feats), "--image-root", str(TINY), "--workers", "1"])
    assert not feats.exists() or not any(feats.iterdir())


def test_extract_skips_broken_images_and_keeps_rows_paired(cli_fast, checkpoint, tmp_path):
    """Broken images are left out with their texts (np_img / np_text rows stay paired) and listed in skipped.json by
    jsonl line; a jsonl whose images are all broken is one line, exit 2, and writes nothing."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n", encoding="utf-8")
    (tmp_path / "cut.png").write_bytes((TINY / "images/b.png").read_bytes()[:30])
    rows = [json.loads(x) for x in (TINY / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    broken = [{**rows[1], "image_id": str(tmp_path / "empty.png")}, {**rows[3], "image_id": str(tmp_path / "text.png")}]
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [rows[0], broken[0], rows[2], broken[1]])
                     + "\n", encoding="utf-8")
    feats = tmp_path / "feats"
    args = ["-m", "brivl_infer.extract", "--cfg", str(TINY_CFG), "--checkpoint", str(checkpoint), "--features",
            str(feats), "--image-root", str(TINY), "--batch-size", "3", "--device", "cpu", "--workers", "0"]
    r = cli_fast(*args, "--jsonl", str(jsonl))
    assert r.returncode == 0, r.stderr
    assert "skipped 2 sample(s) whose image cannot be read" in r.stdout and "wrote 2 image and text" in r.stdout
    ref = np.load(TINY / "parity.npz")
    img, text = np.load(feats / "np_img.npy"), np.load(feats / "np_text.npy")
    assert img.shape == text.shape == (2, 1280)
    assert np.abs(img - ref["np_img"][[0, 2]]).max() < 1e-5 and np.abs(text - ref["np_text"][[0, 2]]).max() < 1e-5
    report = json.loads((feats / "skipped.json").read_text(encoding="utf-8"))
    assert report["skipped"] == 2
    assert [(s["line"], s["image"]) for s in report["samples"]] == [(2, str(tmp_path / "empty.png")),
                                                                   (4, str(tmp_path / "text.png"))]
    # all broken: one line, exit 2, the earlier features stay as they were
    jsonl.write_text("\n".join(json.dumps({**rows[0], "image_id": str(tmp_path / n)})
                               for n in ("empty.png", "text.png", "cut.png")) + "\n", encoding="utf-8")
    line = one_line_error(cli_fast(*args, "--jsonl", str(jsonl)))
    assert "no readable image among its 3 samples" in line
    assert np.load(feats / "np_img.npy").shape == (2, 1280)


def test_recall_ties_break_to_the_lower_index():
    """All scores tied: query i ranks i (lower indices first), so R@1 = 1/N exactly, every run."""
    same = np.ones((3, 4))
    res = evaluate.recalls(same, same, ks=(1, 2, 5))
    assert res["i2t"] == res["t2i"] == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@5": 100.0})
    # image 0 prefers text 1, texts prefer their own image: i2t R@1 = 2/3, t2i R@1 = 1
    img = np.array([[1.0, 0.9, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    text = np.array([[0.8, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    res = evaluate.recalls(img, text, ks=(1, 2))
    assert res["i2t"] == pytest.approx({"R@1": 200 / 3, "R@2": 100.0})
    assert res["t2i"] == pytest.approx({"R@1": 100.0, "R@2": 100.0})
    assert res["mean_recall"] == pytest.approx((200 / 3 + 300) / 4)
    assert np.array_equal(ranks(img, text), [1, 0, 0])


def test_evaluate_input_errors(cli, tmp_path):
    line = one_line_error(cli("-m", "brivl_infer.evaluate", "--features", str(tmp_path)))
    assert "np_img.npy not found" in line
    np.save(tmp_path / "np_img.npy", np.ones((3, 8), np.float32))
    np.save(tmp_path / "np_text.npy", np.ones((2, 8), np.float32))
    with pytest.raises(UserError, match="do not pair up"):
        evaluate.main(["--features", str(tmp_path)])
    np.save(tmp_path / "np_text.npy", np.full((3, 8), np.nan, np.float32))
    with pytest.raises(UserError, match="non-finite"):
        evaluate.main(["--features", str(tmp_path)])


def test_scorer(checkpoint):
    scorer = make_scorer([str(TINY_CFG), str(checkpoint)], device="cpu", batch_size=2)
    images = [Image.open(TINY / f"images/{n}.png") for n in "abcd"]  # RGB, RGBA and L images
    scores = scorer.score("一只小猫坐在红色的沙发上", images)
    model = scorer.model
    text = model.encode_texts(["一只小猫坐在红色的沙发上"])[0]
    want = torch.cat([model.encode_images([img]) for img in images]) @ text
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert np.allclose(scores, want.numpy(), atol=1e-6) and np.ptp(scores) > 1e-4
    with pytest.raises(UserError, match="brivl:CFG_YML:CHECKPOINT"):
        make_scorer([str(TINY_CFG)])
    with pytest.raises(UserError, match="checkpoint not found"):
        make_scorer([str(TINY_CFG), str(checkpoint) + ".missing"], device="cpu")
