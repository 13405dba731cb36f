"""zh_t2i_base: the pieces every package shares (retrieval metrics, images, the ValueError -> UserError boundary)."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from PIL import Image

from zh_t2i_base.cli import IN_DIR, IN_FILE, OUT_DIR, OUT_FILE, UserError, run, user_errors
from zh_t2i_base.fileio import ensure_writable_dir, read_structured
from zh_t2i_base.images import save_image_grid, to_pil, to_uint8
from zh_t2i_base.retrieval import ranks, recall_metrics


def test_ranks_with_positives_ties_and_queries_without_a_positive():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # query 0 ties candidates 0 and 1 (score 1); its positive 1 ranks after the tied lower index 0
    positive = np.array([[False, True, False, False], [False, False, True, True], [False, False, False, False]])
    assert ranks(q, c, positive).tolist() == [1, 0, 4]
    # the default positive is the diagonal; chunking does not change a rank
    qq = np.random.default_rng(0).normal(size=(7, 3))
    qq /= np.linalg.norm(qq, axis=1, keepdims=True)  # unit rows: each is its own best match
    assert np.array_equal(ranks(qq, qq, chunk=2), ranks(qq, qq)) and ranks(qq, qq).tolist() == [0] * 7
    m = recall_metrics(np.array([0, 1, 4, 9]), ks=(1, 5))
    assert m == {"R@1": 25.0, "R@5": 75.0, "mean_recall": 50.0, "median_rank": 3.0, "mean_rank": 4.5}


def test_images_round_like_torchvision_and_grid_lays_out_rows(tmp_path):
    x = torch.tensor([0.0, 0.5 / 255, 1.5 / 255, 0.999, 1.2, -0.1]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 1, 2, 255, 255, 0]
    assert to_uint8(x).shape == (2, 1, 6, 3)
    assert [im.size for im in to_pil(x)] == [(6, 1), (6, 1)]
    path = save_image_grid(torch.rand(5, 3, 4, 4), tmp_path / "g.png", nrow=2)
    assert Image.open(path).size == (2 * 6 + 2, 3 * 6 + 2)


def test_user_errors_converts_only_the_types_given():
    with pytest.raises(UserError, match="bad shape"), user_errors(ValueError):
        raise ValueError("bad shape")
    with pytest.raises(KeyError), user_errors(ValueError):
        raise KeyError("a bug keeps its type")


def test_numbered_images_from_one_listing(tmp_path):
    from zh_t2i_base.images import numbered_images

    for name in ("0.png", "1.jpg", "1.png", "2.JPEG", "07.png", "x.png", "3.txt", "grid.png"):
        (tmp_path / name).write_bytes(b"")
    found = numbered_images(tmp_path)
    assert {i: p.name for i, p in found.items()} == {0: "0.png", 1: "1.png", 2: "2.JPEG"}
    assert numbered_images(tmp_path, (".jpg", ".png"))[1].name == "1.jpg"  # the extension listed first wins


def test_path_args_check_without_creating_anything(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    assert OUT_FILE(str(tmp_path / "new" / "deeper" / "out.json")) == str(tmp_path / "new" / "deeper" / "out.json")
    assert OUT_DIR(str(tmp_path / "run")) and OUT_DIR(str(tmp_path)) and IN_FILE(str(tmp_path / "f.txt"))
    for arg, value, message in [
        (OUT_FILE, tmp_path, "is a directory"), (OUT_FILE, tmp_path / "f.txt" / "x.json", "is not a directory"),
        (OUT_DIR, tmp_path / "f.txt", "exists and is not a directory"), (IN_FILE, tmp_path, "is a directory"),
        (IN_FILE, tmp_path / "nope", "not found"), (IN_DIR, tmp_path / "f.txt", "is not a directory"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            arg(str(value))
    assert sorted(tmp_path.rglob("*")) == before  # the write probe is removed, no directory is made
    assert OUT_DIR("") == ""  # an empty value means "not given"


def test_structured_files_fail_in_one_line_naming_the_file(tmp_path):
    cases = {"a.json": (b'{"a": 1,', "a.json:1: not valid JSON"), "b.json": (b"[1, 2]", "expected an object"),
             "c.json": (b"\xff\xfe{}", "not valid UTF-8"), "d.yaml": (b"a: [1\nb: 2\n", "d.yaml:2: not valid YAML"),
             "e.yaml": (b"- 1\n", "expected an object")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=re.escape(message)):
            read_structured(tmp_path / name, "test file", yaml=name.endswith(".yaml"))
    with pytest.raises(UserError, match="test file not found"):
        read_structured(tmp_path / "none.json", "test file")
    (tmp_path / "ok.yaml").write_text("lr: 1e-3\n")
    assert read_structured(tmp_path / "ok.yaml", yaml=True) == {"lr": "1e-3"}  # YAML 1.1: a string, see check_value


def test_run_reports_user_errors_only_and_removes_the_directories_it_made(tmp_path, capsys):
    def failing(argv):
        ensure_writable_dir(tmp_path / "out" / "deep")
        raise UserError("bad input\nsecond line")

    with pytest.raises(SystemExit) as e:
        run(failing, [], prog="prog")
    assert e.value.code == 2 and capsys.readouterr().err == "prog: error: bad input second line\n"
    assert not (tmp_path / "out").exists()

    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # a bug keeps its traceback
        run(buggy, [], prog="prog")
