"""``python -m zh_t2i_eval``: FID/KID from local Inception weights (random weights here: the plumbing, offline), the
judge-space Fréchet distance, a scorer's mean text-image score, its errors; the demo report's S5 figures from it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import REPO, one_line_error
from form_data import synth
from zh_t2i_eval.frechet import frechet_distance
from zh_t2i_eval.inception import INCEPTION_FILE


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    synth.write_dataset(root / "data", n_train=64, n_val=24, image_size=32, progress=False)
    return root / "data"


def listed(listing: Path) -> list[tuple[Path, str]]:
    """(image path, caption) of an open_clip CSV (title, filepath)."""
    rows = [line.split("\t") for line in listing.read_text(encoding="utf-8").splitlines()[1:]]
    return [(listing.parent / path, title) for title, path in rows]


def write_gen(out: Path, images: list[Image.Image | Path], prompt: str | None = "一个大的红色圆形") -> Path:
    """``out/{i}.png`` + meta.json, as dalle_gen.py writes them."""
    out.mkdir(parents=True)
    for i, img in enumerate(images):
        if isinstance(img, Path):
            shutil.copy(img, out / f"{i}.png")
        else:
            img.save(out / f"{i}.png")
    if prompt is not None:
        (out / "meta.json").write_text(json.dumps({"prompt": prompt, "n": len(images)}, ensure_ascii=False),
                                       encoding="utf-8")
    return out


def shifted(path: Path, seed: int) -> Image.Image:
    """The image blurred and noised: another distribution for the judge's shape features."""
    img = Image.open(path).convert("RGB").filter(ImageFilter.GaussianBlur(2))
    noise = np.random.default_rng(seed).normal(0, 40, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    """A judge with seeded random weights (its features are what is tested, not its verdicts)."""
    import torch

    from zh_t2i_demo.judge import Judge

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval_judge") / "judge.pt"
    Judge(size=32).save(path)
    return path


def evaluate(cli_fast, *args: str) -> dict:
    r = cli_fast("-m", "zh_t2i_eval", *args, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = args[args.index("--out") + 1]
    return json.loads(Path(out).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------------
# the Fréchet distance


def test_frechet_distance_is_torch_fidelitys_formula():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    for nx, ny, d in ((5, 7, 16), (40, 60, 16), (3, 3, 8)):  # fewer and more samples than dimensions
        x, y = rng.normal(size=(nx, d)), rng.normal(0.3, 1.5, size=(ny, d))
        stats = [{"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)} for f in (x, y)]
        want = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
        assert frechet_distance(x, y) == pytest.approx(want, rel=1e-6)
        assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# ---------------------------------------------------------------------------------------------------------------------
# FID / KID: local weights only


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A random-weight state dict of torch-fidelity's InceptionV3 (the right architecture, the right keys), saved
    locally: built without the download its constructor would make (both loaders stubbed while it is built)."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in model.modules():  # activations that neither vanish nor explode through 90-odd layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def no_download(monkeypatch):
    """torch-fidelity's downloader raises: the weights come from the local file or not at all."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch-fidelity tried to download {args}")

    monkeypatch.setattr(fe, "load_state_dict_from_url", refuse)


def test_missing_inception_weights_name_the_file(cli_fast, data, tmp_path):
    gen = write_gen(tmp_path / "gen", [p for p, _ in listed(data / "val_clip.csv")[:3]])
    real = str(data / "val_clip.csv")
    line = one_line_error(cli_fast("-m", "zh_t2i_eval", str(gen), "--real", real))  # no flag
    assert INCEPTION_FILE in line and "--inception-weights" in line and "--no-fid" in line
    assert "github.com/toshas/torch-fidelity/releases" in line
    line = one_line_error(cli_fast("-m", "zh_t2i_eval", str(gen), "--real", real, "--inception-weights",
                                   str(tmp_path / "missing.pth")))
    assert "not found" in line and INCEPTION_FILE in line
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    line = one_line_error(cli_fast("-m", "zh_t2i_eval", str(gen), "--real", real, "--inception-weights",
                                   str(garbage)))
    assert "not a loadable weights file" in line and INCEPTION_FILE in line
    assert not (gen / "eval.json").exists()


def test_wrong_inception_weights_are_one_line(cli_fast, data, tmp_path, no_download):
    import torch

    gen = write_gen(tmp_path / "gen", [p for p, _ in listed(data / "val_clip.csv")[:3]])
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(4, 2).state_dict(), other)
    line = one_line_error(cli_fast("-m", "zh_t2i_eval", str(gen), "--real", str(data / "val_clip.csv"),
                                   "--inception-weights", str(other)))
    assert "do not fit" in line and INCEPTION_FILE in line


def test_fid_kid_offline_with_local_weights(cli_fast, data, inception_weights, tmp_path, no_download):
    """The plumbing with random Inception weights: a set against itself gives FID ≈ 0; against another set (noise
    images), FID > 0 and a larger KID (KID's unbiased estimate of a set against itself is not exactly 0)."""
    val = [p for p, _ in listed(data / "val_clip.csv")][:3]
    real = write_gen(tmp_path / "real", val, prompt=None)
    same = write_gen(tmp_path / "same", val)
    rng = np.random.default_rng(0)
    other = write_gen(tmp_path / "other", [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                                           for _ in val])
    common = ["--real", str(real), "--inception-weights", str(inception_weights), "--kid-subsets", "4"]
    r_same = evaluate(cli_fast, str(same), *common, "--out", str(tmp_path / "same.json"))
    r_other = evaluate(cli_fast, str(other), *common, "--out", str(tmp_path / "other.json"))
    assert r_same["generated"]["n"] == r_same["real"]["n"] == 3
    assert r_same["settings"]["kid_subset_size"] == 3 and r_same["settings"]["inception_weights"]
    assert r_other["metrics"]["fid"] > 1.0 and r_same["metrics"]["fid"] == pytest.approx(0.0, abs=1e-9)
    assert r_other["metrics"]["kid"] > 0 and r_other["metrics"]["kid"] > r_same["metrics"]["kid"] + 0.01


# ---------------------------------------------------------------------------------------------------------------------
# the judge-space Fréchet distance


def test_judge_fd_is_zero_for_the_same_images_and_grows_with_a_shift(cli_fast, data, judge, tmp_path):
    val = [p for p, _ in listed(data / "val_clip.csv")]
    same = write_gen(tmp_path / "same", val)
    moved = write_gen(tmp_path / "moved", [shifted(p, i) for i, p in enumerate(val)])
    common = ["--real", str(data / "val_clip.csv"), "--judge", str(judge), "--no-fid"]
    fd_same = evaluate(cli_fast, str(same), *common, "--out", str(tmp_path / "a.json"))
    fd_moved = evaluate(cli_fast, str(moved), *common, "--out", str(tmp_path / "b.json"))
    fd_train = evaluate(cli_fast, str(same), "--real", str(data / "train_clip.csv"), "--judge", str(judge),
                        "--no-fid", "--out", str(tmp_path / "c.json"))  # other real images of the same kind
    assert fd_same["real"]["n"] == fd_same["generated"]["n"] == len(val)
    assert fd_same["settings"]["judge_feature_dim"] == 64
    a, b, c = (r["metrics"]["judge_fd"] for r in (fd_same, fd_moved, fd_train))
    assert a == pytest.approx(0.0, abs=1e-9) and b > 0 and c > 0
    assert b > 2 * c, (b, c)  # the shift moves it more than another real sample does (2.6x, random judge weights)


def test_prompt_folders_and_bad_inputs(cli, cli_fast, data, judge, tmp_path):
    val = [p for p, _ in listed(data / "val_clip.csv")]
    gen = tmp_path / "gen"
    write_gen(gen / "p0", val[:4], "一个大的红色圆形")
    write_gen(gen / "p1", val[4:7], "一个大的蓝色正方形")
    (gen / "p1" / "2.png").write_bytes(b"not an image")  # skipped and counted, not fatal
    real = str(data / "val_clip.csv")
    r = evaluate(cli_fast, str(gen), "--real", real, "--judge", str(judge), "--no-fid", "--out",
                 str(tmp_path / "out" / "eval.json"))
    assert [s["dir"] for s in r["generated"]["sets"]] == ["p0", "p1"]
    assert [s["n"] for s in r["generated"]["sets"]] == [4, 2] and r["generated"]["n"] == 6
    assert [Path(p).name for p in r["generated"]["skipped"]] == ["2.png"]
    # one line, exit 2, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no generated images" in one_line_error(cli_fast("-m", "zh_t2i_eval", str(empty), "--real", real,
                                                            "--judge", str(judge), "--no-fid"))
    assert "not found" in one_line_error(cli_fast("-m", "zh_t2i_eval", str(tmp_path / "nope"), "--real", real,
                                                  "--no-fid", "--judge", str(judge)))
    one = write_gen(tmp_path / "one", val[:1])
    line = one_line_error(cli_fast("-m", "zh_t2i_eval", str(one), "--real", real, "--judge", str(judge), "--no-fid"))
    assert "at least 2" in line and "covariance" in line
    line = one_line_error(cli_fast("-m", "zh_t2i_eval", str(gen), "--real", str(empty), "--judge", str(judge),
                                   "--no-fid"))
    assert "no image files" in line
    line = one_line_error(cli_fast("-m", "zh_t2i_eval", str(gen), "--judge", str(judge), "--no-fid"))
    assert "--real" in line
    assert "nothing to compute" in one_line_error(cli_fast("-m", "zh_t2i_eval", str(gen), "--no-fid"))
    noprompt = write_gen(tmp_path / "noprompt", val[:2], prompt=None)
    line = one_line_error(cli_fast("-m", "zh_t2i_eval", str(noprompt), "--no-fid", "--scorer", "clip:x"))
    assert "--prompt" in line
    assert "unknown scorer" in one_line_error(cli_fast("-m", "zh_t2i_eval", str(gen), "--no-fid", "--scorer", "x:y"))
    assert sorted(tmp_path.rglob("eval.json")) == [tmp_path / "out" / "eval.json"]  # the successful run's only
    # the real process: the same one line
    assert "no generated images" in one_line_error(cli("-m", "zh_t2i_eval", str(empty), "--no-fid", "--judge",
                                                       str(judge), "--real", real))


# ---------------------------------------------------------------------------------------------------------------------
# a scorer's mean text-image score


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, data) -> Path:
    """A tiny CLIP run (3 steps: the bookkeeping is tested, not the scores' quality)."""
    from clip_train.train import ClipConfig, train
    from form_data.tokenizer import build_vocab, read_captions
    from train_runtime import RuntimeConfig

    root = tmp_path_factory.mktemp("eval_clip")
    build_vocab(read_captions(data / "train_clip.csv"), root / "vocab.txt")
    cc = ClipConfig(model="zh-tiny", image_size=32, vocab=str(root / "vocab.txt"),
                    train_data=str(data / "train_clip.csv"))
    train(cc, RuntimeConfig(out_dir=str(root / "run"), max_steps=3, batch_size=16, workers=0, lr=1e-3))
    return root / "run"


def test_scorer_mean_overall_and_per_prompt(cli_fast, data, clip_run, tmp_path):
    from zh_t2i_rerank.registry import make_scorer

    val = [p for p, _ in listed(data / "val_clip.csv")]
    gen = tmp_path / "gen"  # dalle_gen.py @FILE layout: one folder per prompt
    prompts = ["一个大的红色圆形", "一个小的蓝色正方形"]
    write_gen(gen / "p0", val[:5], prompts[0])
    write_gen(gen / "p1", val[5:8], prompts[1])
    r = evaluate(cli_fast, str(gen), "--scorer", f"clip:{clip_run}", "--no-fid", "--out", str(tmp_path / "e.json"))
    scorer = make_scorer(f"clip:{clip_run}", device="cpu")
    want = [scorer.score(t, [Image.open(p).convert("RGB") for p in ps]) for t, ps in zip(prompts, (val[:5], val[5:8]),
                                                                                          strict=True)]
    sets = r["generated"]["sets"]
    assert [s["prompt"] for s in sets] == prompts
    np.testing.assert_allclose([s["score"] for s in sets], [w.mean() for w in want], atol=1e-5)
    assert r["metrics"]["text_image_score"] == pytest.approx(float(np.concatenate(want).mean()), abs=1e-5)
    assert r["settings"]["scorer"] == f"clip:{clip_run}" and r["real"]["n"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# the demo: scripts/demo.sh runs it, the report shows it (on a small fake run dir: the demo itself is slow)


def fake_demo_run(run: Path, data: Path, judge: Path) -> None:
    """What the report reads of a demo run, made small: step outputs, a judge, two prompts' generations."""
    run.mkdir()
    (run / "vae_eval.json").write_text(json.dumps({"psnr": 20.0, "used_fraction": 0.5}))
    (run / "judge").mkdir()
    shutil.copy(judge, run / "judge" / "judge.pt")
    (run / "judge" / "judge_report.json").write_text(json.dumps({"heldout_accuracy": {"all/shape": 0.5}}))
    (run / "clip").mkdir()
    (run / "clip" / "result.json").write_text(json.dumps({"eval": {"eval/i2t_attr_R@1": 50.0}}))
    val = [p for p, _ in listed(data / "val_clip.csv")]
    for k, prompt in enumerate(("一个大的红色正方形", "一个大的红色圆形")):
        gen = write_gen(run / "gen" / f"p{k}", val[4 * k:4 * k + 4], prompt)
        rows = [{"file": f"{i}.png", "score": float(-i), "rank": i + 1} for i in range(4)]
        (gen / "ranking.json").write_text(json.dumps({"text": prompt, "ranking": rows}, ensure_ascii=False))


def test_demo_report_shows_each_generators_judge_fd(cli_fast, data, judge, tmp_path):
    from zh_t2i_demo.report import build_report

    run = tmp_path / "run"
    fake_demo_run(run, data, judge)
    # the demo's own command line for its generator (scripts/demo.sh, GENERATORS=(dalle:gen))
    r = evaluate(cli_fast, str(run / "gen"), "--real", str(data / "val_clip.csv"), "--judge", str(run / "judge"),
                 "--no-fid", "--out", str(run / "eval" / "dalle.json"))
    # a second generator's folder (a masked generator, later) is reported the same way, without a code change
    masked = {**r, "metrics": {"judge_fd": 2.5}}
    (run / "eval" / "masked.json").write_text(json.dumps(masked))
    m = build_report(run, top_k=2, group_size=4)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["S5/dalle/judge_fd"] == pytest.approx(r["metrics"]["judge_fd"]) and saved["S5/masked/judge_fd"] == 2.5
    assert saved["S5/dalle/n_generated"] == 8 and saved["S5/dalle/n_real"] == 24
    assert "S5/dalle/judge_fd" in m["table"] and "S5/masked/judge_fd" in m["table"]
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Sample quality against the real val images" in page
    assert "<td>dalle</td><td>8</td><td>24</td>" in page and "<td>masked</td>" in page
    # a broken evaluation file: one line, exit 2
    (run / "eval" / "masked.json").write_text(json.dumps({"metrics": {"judge_fd": "x"}, "generated": {},
                                                          "real": {}}))
    assert "zh_t2i_eval" in one_line_error(cli_fast("-m", "zh_t2i_demo", "report", str(run), "--top-k", "2",
                                                    "--group-size", "4"))


def test_demo_script_runs_the_evaluation():
    script = REPO / "scripts" / "demo.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text(encoding="utf-8")
    assert "GENERATORS=(dalle:gen)" in text
    assert '-m zh_t2i_eval "$RUN/${g#*:}" --real "$RUN/data/val_clip.csv" --judge "$RUN/judge" --no-fid' in text
    assert '--out "$RUN/eval/${g%%:*}.json"' in text
