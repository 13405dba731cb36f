"""zh_t2i_base: the pieces every package shares (retrieval metrics, images, the ValueError -> UserError boundary)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zh_t2i_base.cli import UserError, user_errors
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
