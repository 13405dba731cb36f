"""``python clip_sort.py TEXT N DIR``: ranking table, ranking.json, top/, ranked_grid.png; bad inputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clip_sort
from clip_train.train import ClipConfig, train
from conftest import one_line_error
from form_data import synth
from form_data.tokenizer import build_vocab, read_captions
from train_runtime import RuntimeConfig
from zh_t2i_base.cli import UserError
from zh_t2i_rerank.registry import make_scorer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny CLIP run (a few steps: the outputs' bookkeeping is tested here, not the ranking quality)."""
    root = tmp_path_factory.mktemp("clip_sort")
    synth.write_dataset(root / "data", n_train=64, n_val=8, image_size=32, progress=False)
    build_vocab(read_captions(root / "data" / "train_clip.csv"), root / "vocab.txt")
    cc = ClipConfig(model="zh-tiny", image_size=32, vocab=str(root / "vocab.txt"),
                    train_data=str(root / "data" / "train_clip.csv"))
    train(cc, RuntimeConfig(out_dir=str(root / "run"), max_steps=3, batch_size=16, workers=0, lr=1e-3))
    return root / "run"


@pytest.fixture
def gen_dir(tmp_path) -> Path:
    """Five generated images as dalle_gen.py writes them: {i}.png, one as {i}.jpg."""
    out = tmp_path / "gen"
    out.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        img = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
        img.save(out / (f"{i}.jpg" if i == 3 else f"{i}.png"))
    return out


@pytest.mark.slow
def test_outputs(cli, ckpt, gen_dir):
    r = cli("clip_sort.py", "大红色圆形", "5", str(gen_dir), "--scorer", f"clip:{ckpt}", "--top-k", "3",
            "--batch-size", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ranking = json.loads((gen_dir / "ranking.json").read_text(encoding="utf-8"))
    rows = ranking["ranking"]
    assert ranking["text"] == "大红色圆形" and [row["rank"] for row in rows] == [1, 2, 3, 4, 5]
    assert sorted(row["file"] for row in rows) == ["0.png", "1.png", "2.png", "3.jpg", "4.png"]
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    # the score of each file is the scorer's own score of that image
    files = sorted(gen_dir.glob("[0-9].*"), key=lambda p: int(p.stem))
    direct = make_scorer(f"clip:{ckpt}", device="cpu").score("大红色圆形", [Image.open(p) for p in files])
    by_file = {row["file"]: row["score"] for row in rows}
    np.testing.assert_allclose([by_file[p.name] for p in files], direct, atol=1e-5)
    # top-k copies in rank order, byte-identical to the originals
    top = sorted(p.name for p in (gen_dir / "top").iterdir())
    assert top == [f"{row['rank']}_{row['file']}" for row in rows[:3]]
    for row in rows[:3]:
        assert (gen_dir / "top" / f"{row['rank']}_{row['file']}").read_bytes() == (gen_dir / row["file"]).read_bytes()
    grid = Image.open(gen_dir / "ranked_grid.png")
    assert grid.size == (5 * 160, 180)
    # the table lists every file, best first
    table = [line.split() for line in r.stdout.splitlines()[1:6]]
    assert [t[2] for t in table] == [row["file"] for row in rows]


@pytest.mark.slow
def test_prompt_file_ranks_each_directory_as_its_own_call(ckpt, gen_dir, tmp_path):
    root = tmp_path / "many"
    for i in range(2):
        shutil.copytree(gen_dir, root / f"p{i}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("大红色圆形\n小蓝色星形\n", encoding="utf-8")
    assert clip_sort.main([f"@{prompts}", "5", str(root), "--scorer", f"clip:{ckpt}", "--device", "cpu"]) == 0
    assert clip_sort.main(["小蓝色星形", "5", str(gen_dir), "--scorer", f"clip:{ckpt}", "--device", "cpu"]) == 0
    texts = [json.loads((root / p / "ranking.json").read_text(encoding="utf-8"))["text"] for p in ("p0", "p1")]
    assert texts == ["大红色圆形", "小蓝色星形"]
    one = json.loads((gen_dir / "ranking.json").read_text(encoding="utf-8"))["ranking"]
    assert json.loads((root / "p1" / "ranking.json").read_text(encoding="utf-8"))["ranking"] == one
    (root / "p1" / "4.png").unlink()  # a missing image in any directory fails before anything is scored
    with pytest.raises(UserError, match="missing"):
        clip_sort.main([f"@{prompts}", "5", str(root), "--scorer", f"clip:{ckpt}", "--device", "cpu"])


@pytest.mark.slow
def test_rerun_replaces_top(ckpt, gen_dir):
    (gen_dir / "top").mkdir()
    (gen_dir / "top" / "stale.png").write_bytes(b"old")
    assert clip_sort.main(["小蓝色星形", "4", str(gen_dir), "--scorer", f"clip:{ckpt}", "--top-k", "2",
                           "--device", "cpu"]) == 0
    assert len(list((gen_dir / "top").iterdir())) == 2
    assert len(json.loads((gen_dir / "ranking.json").read_text())["ranking"]) == 4
    assert not [p for p in gen_dir.iterdir() if p.name.startswith(".")]  # no staging leftovers


def prepare(case: str, gen_dir: Path, tmp_path: Path, ckpt: Path) -> list[str]:
    """clip_sort.py arguments for one bad input."""
    n, directory, scorer = "5", str(gen_dir), f"clip:{ckpt}"
    if case == "n_too_large":
        n = "7"
    elif case == "unknown_scorer":
        scorer = "dalle:x"
    elif case == "bad_checkpoint":
        (tmp_path / "bad.pt").write_bytes(b"garbage")
        scorer = f"clip:{tmp_path / 'bad.pt'}"
    elif case == "broken_image":
        (gen_dir / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif case == "brivl_paths":
        scorer = f"brivl:{tmp_path / 'none.yml'}:{tmp_path / 'none.pth'}"
    return ["大红色圆形", n, directory, "--scorer", scorer, "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("n_too_large", "2 of the 7 images are missing (5.png, 6.png)"),
    ("unknown_scorer", "unknown scorer 'dalle'"),
    ("bad_checkpoint", "not a loadable checkpoint"),
])
def test_bad_inputs_are_one_line_errors(cli, cli_fast, ckpt, gen_dir, tmp_path, case, message):
    run = cli if case == "n_too_large" else cli_fast  # one real process; the rest in-process
    r = run("clip_sort.py", *prepare(case, gen_dir, tmp_path, ckpt))
    assert message in one_line_error(r)
    assert not (gen_dir / "ranking.json").exists() and not (gen_dir / "top").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("brivl_paths", "none.yml"),
])
def test_more_bad_inputs_raise_user_errors(ckpt, gen_dir, tmp_path, case, message):
    with pytest.raises(UserError, match=re.escape(message)):
        clip_sort.main(prepare(case, gen_dir, tmp_path, ckpt))
    assert not (gen_dir / "ranking.json").exists() and not (gen_dir / "top").exists()


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_and_listed(ckpt, gen_dir, capsys):
    (gen_dir / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (gen_dir / "4.png").write_bytes(b"")
    assert clip_sort.main(["大红色圆形", "5", str(gen_dir), "--scorer", f"clip:{ckpt}", "--device", "cpu"]) == 0
    ranking = json.loads((gen_dir / "ranking.json").read_text(encoding="utf-8"))
    assert sorted(r["file"] for r in ranking["ranking"]) == ["0.png", "1.png", "3.jpg"]
    assert ranking["skipped"] == ["2.png", "4.png"] and "skipped 2 unreadable image(s)" in capsys.readouterr().out
    for i in (0, 1):
        (gen_dir / f"{i}.png").write_bytes(b"not an image")
    (gen_dir / "3.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="no readable image among the 5"):
        clip_sort.main(["大红色圆形", "5", str(gen_dir), "--scorer", f"clip:{ckpt}", "--device", "cpu"])


def test_missing_images_are_counted_from_one_listing(gen_dir):
    """A huge N is answered at once (one directory listing), saying how many of the N exist."""
    with pytest.raises(UserError, match=r"999999995 of the 1000000000 images are missing .*only 5 of"):
        clip_sort.main(["大红色圆形", "1000000000", str(gen_dir), "--scorer", "clip:nowhere"])


def test_n_must_be_positive(gen_dir):
    with pytest.raises(SystemExit) as e:
        clip_sort.main(["大红色圆形", "0", str(gen_dir)])
    assert e.value.code == 2


@pytest.mark.slow
def test_top_k_larger_than_n(ckpt, gen_dir, capsys):
    shutil.copy(gen_dir / "0.png", gen_dir / "9.png")  # beyond N: ignored
    assert clip_sort.main(["大红色圆形", "2", str(gen_dir), "--scorer", f"clip:{ckpt}", "--top-k", "10",
                           "--device", "cpu"]) == 0
    assert sorted(p.name[2:] for p in (gen_dir / "top").iterdir()) == ["0.png", "1.png"]
    assert "wrote" in capsys.readouterr().out
