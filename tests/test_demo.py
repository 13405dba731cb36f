"""The demo's measurement side: the colour/shape judge on hand-made and held-out images, the rerank-gain arithmetic,
and the reduced demo (DEMO_PROFILE=ci) end to end: every artefact, every metric finite and in range, the report page
rendered by headless Chromium with every image loaded."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conftest import REPO, one_line_error
from form_data import synth
from zh_t2i_demo.judge import Judge, accuracy, object_colour, rendered_split
from zh_t2i_demo.report import TARGETS, rerank_gain


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


def test_shape_classifier_generalises_to_unseen_combinations(judge):
    images, attrs = rendered_split(480, holdout=synth.DEFAULT_HOLDOUT)
    acc = accuracy(judge, images, attrs)
    assert acc["unseen/n"] >= 60
    assert acc["unseen/shape"] >= 0.95 and acc["seen/shape"] >= 0.95
    assert acc["all/colour"] >= 0.98


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


# ---------------------------------------------------------------------------------------------------------------------
# the reduced demo, end to end


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("demo") / "run"
    env = {**os.environ, "DEMO_PROFILE": "ci", "RUN_DIR": str(run), "PYTHON": os.environ.get("PYTHON", "python"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run / "stdout.txt").write_text(r.stdout)
    return run


def test_demo_writes_every_artefact_and_finite_metrics(demo_run):
    run = demo_run
    for rel in ("raw/wukong_raw.csv", "clean/train.csv", "data/train_clip.csv", "data/wds", "vocab.txt",
                "vae_eval.json", "judge/judge.pt", "tokens/train.pt", "tokens/val.pt", "dalle/dalle.safetensors",
                "clip/result.json", "metrics.json", "report.html", "timings.tsv"):
        assert (run / rel).exists(), rel
    for p in ("p0", "p1"):
        gen = run / "gen" / p
        for rel in ("0.png", "7.png", "grid.png", "meta.json", "ranking.json", "judge.json", "ranked_grid.png"):
            assert (gen / rel).is_file(), f"{p}/{rel}"
        assert len(list((gen / "top").iterdir())) == 2
    m = json.loads((run / "metrics.json").read_text())
    for key in TARGETS:
        assert key in m and math.isfinite(m[key]), key
    for key, value in m.items():
        if key.startswith(("S2/", "S4/", "judge/")) and not key.endswith(("/n", "rank")):
            assert 0.0 <= value <= 1.0, (key, value)
    assert 0 < m["S1/psnr"] < 60 and 0 < m["S1/codebook_usage"] <= 1
    assert -100 <= m["S3/gain_points"] <= 100
    assert {p["seen"] for p in m["prompts"]} == {True, False}  # a seen and an unseen combination
    commands = [line for line in (run / "stdout.txt").read_text().splitlines() if line.startswith("+ ")]
    for needed in ("form_data synth", "form_data clean", "form_data download", "form_data export", "form_data vocab",
                   "-m vae_train", "vae_train tokenize", "-m dalle_train", "-m clip_train", "dalle_gen.py",
                   "clip_sort.py", "zh_t2i_demo report"):
        assert any(needed in c for c in commands), f"no printed command for {needed}"


MACHINE_KEYS = ("machine", "date", "calibration")  # where and when it ran: all of metrics.json that may differ


def test_demo_budgets_are_fixed_work_not_time(demo_run):
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert "--max-time" not in script and "max_time" not in script
    for name in ("vae", "dalle", "clip"):
        runtime = json.loads((demo_run / name / "config.json").read_text())["runtime"]
        assert runtime["max_time"] == 0 and runtime["max_steps"] > 0, name


def test_demo_prints_calibration_and_step_table(demo_run):
    out = (demo_run / "stdout.txt").read_text()
    assert re.search(r"^calibration: device (cpu|cuda).*CPU capability \S+, \d+ threads, fp32 2048² matmul "
                     r"[\d.]+ GFLOP/s", out, re.MULTILINE), out[:500]
    cal = json.loads((demo_run / "calibration.json").read_text())
    assert cal["matmul_gflops"] > 0 and cal["slow_kind_factor"] >= 1
    table = out[out.index("== per-step wall time"):]
    for name in ("raw", "download", "vae", "judge", "tokenize", "dalle", "clip", "generate", "report", "total"):
        assert re.search(rf"^{name}\s+[\d.]+\s+[\d.]+\s", table, re.MULTILINE), (name, table)
    assert "compute-bound steps x" in table and "on the slow kind" in table
    from zh_t2i_demo.steps import read_steps

    steps = {s.name: s for s in read_steps(demo_run)}
    # every CLI process of a step logged its start-up line: train + eval, two splits, one trainer, gen + rerank
    processes = {"vae": 2, "judge": 2, "tokenize": 2, "dalle": 1, "clip": 1, "generate": 2, "report": 1}
    assert {name: steps[name].processes for name in processes} == processes
    assert steps["download"].kind == "io" and steps["dalle"].kind == "compute"


def test_calibrate_and_steps_bad_inputs_are_one_line_errors(cli, tmp_path):
    assert "no timings.tsv" in one_line_error(cli("-m", "zh_t2i_demo", "steps", str(tmp_path)))
    assert "--seconds must be > 0" in one_line_error(cli("-m", "zh_t2i_demo", "calibrate", "--seconds", "0"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in one_line_error(cli("-m", "zh_t2i_demo", "calibrate", "--out", str(blocker / "c.json")))


def test_demo_same_seed_gives_identical_metrics(demo_run, tmp_path):
    """A second run from the same data (copied, with its steps marked done) retrains every model: the metrics are
    the same numbers, not merely close."""
    again = tmp_path / "again"
    again.mkdir()
    for rel in ("raw", "clean", "data", "vocab.txt"):
        src = demo_run / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, again / rel)
    for name in ("raw", "clean", "download", "export", "vocab"):
        (again / f".done-{name}").touch()
    env = {**os.environ, "DEMO_PROFILE": "ci", "RUN_DIR": str(again),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "-m vae_train --model" in r.stdout and "-m dalle_train" in r.stdout  # the models were trained again
    first, second = (json.loads((run / "metrics.json").read_text()) for run in (demo_run, again))
    for m in (first, second):
        for key in MACHINE_KEYS:
            m.pop(key, None)
    assert second == first


def test_demo_second_run_reuses_finished_steps(demo_run):
    env = {**os.environ, "DEMO_PROFILE": "ci", "RUN_DIR": str(demo_run),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "-m vae_train --model" not in r.stdout and "-m dalle_train" not in r.stdout
    assert "-m zh_t2i_demo report" in r.stdout


def test_report_renders_in_headless_chromium(demo_run):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the report page was not rendered")
    page = (demo_run / "report.html").resolve().as_uri()
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--allow-file-access-from-files",
                        "--virtual-time-budget=10000", "--dump-dom", page],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    total = re.search(r'data-images-total="(\d+)"', r.stdout)
    loaded = re.search(r'data-images-loaded="(\d+)"', r.stdout)
    assert total and loaded, "the page's load script did not run"
    assert int(total.group(1)) >= 2 * 8 + 1
    assert loaded.group(1) == total.group(1), f"{loaded.group(1)} of {total.group(1)} images loaded"
