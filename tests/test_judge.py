"""The demo's judge: the colour/shape classifier on hand-made and held-out images, at 64 and 32 px, and the
rerank-gain arithmetic of the report."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from form_data import synth
from zh_t2i_demo.judge import Judge, accuracy, object_colour, rendered_split
from zh_t2i_demo.report import rerank_gain


@pytest.fixture(scope="module")
def judge() -> Judge:
    """The shape classifier trained on rendered images of the SEEN combinations only."""
    seen = [c for c in synth.all_combos() if c not in set(synth.DEFAULT_HOLDOUT)]
    images, shapes = [], []
    for _, a, _ in synth.generate_split(1536, "train", seen, 0):
        images.append(synth.render(a, 64, 0))
        shapes.append(a.shape)
    j = Judge()
    j.fit(images, shapes, steps=120, progress=False)
    return j


def hand_made(shape: str, fill: tuple[int, int, int], bg: tuple[int, int, int] = (240, 240, 240)) -> Image.Image:
    img = Image.new("RGB", (64, 64), bg)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([14, 12, 50, 48], fill=fill)
    else:
        d.rectangle([16, 18, 46, 48], fill=fill)
    return img


@pytest.mark.slow
def test_judge_on_hand_made_images(judge):
    red_circle = hand_made("circle", (210, 30, 40))
    blue_square = hand_made("square", (30, 70, 230), bg=(20, 20, 20))
    v_red, v_blue = judge.verdicts([red_circle, blue_square])
    assert v_red.colour == "红" and v_red.shape == "圆形"
    assert v_red.judge("一个大的红色圆形") == {"colour": True, "shape": True, "both": True}
    assert v_blue.colour == "蓝" and v_blue.shape == "正方形"
    assert v_blue.judge("红色正方形") == {"colour": False, "shape": True, "both": False}  # a blue square is not red
    assert object_colour(Image.new("RGB", (64, 64), (128, 128, 128))) is None  # nothing drawn: no colour at all
    assert v_red.judge("蓝色星形")["both"] is False


@pytest.mark.slow
def test_shape_classifier_generalises_to_unseen_combinations(judge):
    images, attrs = rendered_split(480, holdout=synth.DEFAULT_HOLDOUT)
    acc = accuracy(judge, images, attrs)
    assert acc["unseen/n"] >= 60
    assert acc["unseen/shape"] >= 0.95 and acc["seen/shape"] >= 0.95
    assert acc["all/colour"] >= 0.98


@pytest.mark.slow
def test_small_image_judge_works_at_their_side_and_round_trips(tmp_path):
    """A judge for 32-px images classifies at 32 px (a quarter of the compute) and still tells every shape apart on
    rendered images brought to 32 px; its side is saved with it."""
    from form_data.datasets import ResizeCenterCrop

    seen = [c for c in synth.all_combos() if c not in set(synth.DEFAULT_HOLDOUT)]
    small = ResizeCenterCrop(32).pil
    images, shapes = [], []
    for _, a, _ in synth.generate_split(1536, "train", seen, 0):
        images.append(small(synth.render(a, 64, 0)))
        shapes.append(a.shape)
    j = Judge(size=32)
    j.fit(images, shapes, steps=120, progress=False)
    test_images, attrs = rendered_split(240, holdout=synth.DEFAULT_HOLDOUT)
    acc = accuracy(j, [small(im) for im in test_images], attrs)
    assert acc["all/shape"] >= 0.9 and acc["all/colour"] >= 0.98, acc
    j.save(tmp_path / "judge.pt")
    again = Judge.load(tmp_path)
    assert again.size == 32
    probe = [small(im) for im in test_images[:16]]
    assert [(v.colour, v.shape) for v in again.verdicts(probe)] == [(v.colour, v.shape) for v in j.verdicts(probe)]


def test_rerank_gain_arithmetic():
    both = [True, False, False, False] * 2
    scores = [0.9, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.9]  # group 1: the good one ranked first; group 2: a bad one first
    assert rerank_gain(both, scores, k=1, group_size=4) == pytest.approx([75.0, -25.0])
    assert rerank_gain(both, scores, k=4, group_size=4) == pytest.approx([0.0, 0.0])  # top-all == random
