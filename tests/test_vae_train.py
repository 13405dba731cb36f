"""vae_train on the shared runtime, end to end: training, PSNR, resume after kill -9, SIGTERM, torchrun, broken
images, tokenize / eval / load_image_tokenizer, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, one_line_error
from form_data import synth
from train_runtime import RuntimeConfig
from vae_train.load import load_image_tokenizer
from vae_train.train import VAEConfig, train
from zh_t2i_base.cli import UserError

TINY = ["--model", "dvae", "--image-size", "16", "--num-layers", "2", "--hidden-dim", "16", "--num-resnet-blocks", "0",
        "--num-tokens", "64", "--emb-dim", "16", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--eval-images", "16", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth16")
    synth.write_dataset(root, n_train=96, n_val=16, image_size=16, progress=False)
    return root


def run_vae(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "vae_train", *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_until(condition, proc: subprocess.Popen, limit_s: float = 240.0) -> None:
    """Poll ``condition`` while ``proc`` runs; fail (not hang) if the process ends first or never gets there."""
    end = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"process ended before the awaited state: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the awaited state never came")
        time.sleep(0.02)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/model"] for r in rows if "loss/model" in r}


@pytest.mark.slow
def test_dvae_training_raises_psnr(data, tmp_path):
    vc = VAEConfig(model="dvae", train_data=str(data / "train_clip.csv"), val_data=str(data / "train_clip.csv"),
                   image_size=16, num_layers=2, hidden_dim=32, num_resnet_blocks=1, num_tokens=128, emb_dim=32,
                   straight_through=True, anneal_rate=1e-2, eval_images=64)
    rc = RuntimeConfig(out_dir=str(tmp_path / "untrained"), max_steps=1, lr=1e-9, batch_size=16, workers=0)
    before = train(vc, rc)["eval"]["psnr"]
    rc = RuntimeConfig(out_dir=str(tmp_path / "run"), max_steps=200, lr=3e-3, batch_size=16, workers=0,
                       warmup_steps=10, log_every=50)
    after = train(vc, rc)["eval"]
    assert after["psnr"] > before + 6.0, (before, after)  # stated margin: +6 dB on the data it trained on
    assert after["used"] > 8
    assert (tmp_path / "run" / "recon_latest.png").stat().st_size > 100


@pytest.mark.slow
def test_kill9_then_resume_reproduces_losses(data, tmp_path):
    args = [*TINY, "--train-data", str(data / "train_clip.csv"), "--max-steps", "40", "--save-every", "8"]
    full = run_vae(*args, "--out-dir", str(tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stderr.read()
    killed = run_vae(*args, "--out-dir", str(tmp_path / "killed"))
    wait_until(lambda: (tmp_path / "killed" / "ckpt-00000008.pt").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert not (tmp_path / "killed" / "ckpt-00000040.pt").exists()
    resumed = run_vae(*args, "--out-dir", str(tmp_path / "killed"), "--resume", "latest")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 41))
    assert a == b


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    proc = run_vae(*TINY, "--train-data", str(data / "train_clip.csv"), "--max-steps", "100000",
                   "--save-every", "100000", "--out-dir", str(tmp_path))
    log = tmp_path / "metrics.jsonl"
    wait_until(lambda: log.exists() and log.read_text().count("\n") >= 3, proc)  # 3 complete lines (log_every 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved step" in out
    from zh_t2i_base import checkpoint as ckpt_files
    saved = ckpt_files.checkpoints(tmp_path)
    assert len(saved) == 1 and ckpt_files.load(saved[0])["step"] >= 3


@pytest.mark.slow
def test_torchrun_two_ranks_keep_identical_parameters(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "vae_train", *TINY, "--train-data", str(data / "train_clip.csv"), "--max-steps", "6",
                        "--out-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["rank_param_max_diff"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["samples_per_s"] > 0


def test_broken_images_do_not_stop_training(data, tmp_path):
    listing = tmp_path / "with_broken.csv"
    lines = (data / "train_clip.csv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train").symlink_to(data / "train")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows = lines[1:40] + ["坏图\tbroken.png", "空图\tempty.jpg", "缺图\tmissing.png"] * 3
    listing.write_text("\n".join([lines[0], *rows]) + "\n", encoding="utf-8")
    vc = VAEConfig(model="dvae", train_data=str(listing), image_size=16, num_layers=2, hidden_dim=16,
                   num_resnet_blocks=0, num_tokens=32, emb_dim=16)
    result = train(vc, RuntimeConfig(out_dir=str(tmp_path / "run"), max_steps=12, batch_size=8, workers=0,
                                     log_every=12))
    assert result["step"] == 12
    assert result["train"]["skipped_images"] > 0


@pytest.mark.slow
def test_tokenize_eval_and_loading_any_form(data, tmp_path):
    run = tmp_path / "run"
    proc = run_vae(*TINY, "--train-data", str(data / "train_clip.csv"), "--val-data", str(data / "val_clip.csv"),
                   "--max-steps", "5", "--out-dir", str(run))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    images = torch.rand(3, 3, 16, 16)
    codes = [load_image_tokenizer(p).encode(images) for p in (run, run / "ckpt-00000005.pt", run / "model.safetensors")]
    assert codes[0].shape == (3, 16) and all(torch.equal(codes[0], c) for c in codes)

    out = tmp_path / "tokens.pt"
    r = subprocess.run([sys.executable, "-m", "vae_train", "tokenize", "--tokenizer", str(run), "--data",
                        str(data / "val_clip.csv"), "--out", str(out), "--workers", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    tok = torch.load(out, weights_only=True)
    assert tok["tokens"].shape == (16, 16) and len(tok["captions"]) == 16
    assert int(tok["tokens"].max()) < 64 and tok["tokenizer"]["seq_len"] == 16
    model = load_image_tokenizer(run)
    from form_data.datasets import CsvImageText, default_transform

    ds = CsvImageText(data / "val_clip.csv", transform=default_transform(16))
    assert torch.equal(tok["tokens"][0].long(), model.encode(ds[0]["image"][None])[0])
    assert tok["captions"][0] == ds[0]["caption"]
    # --hflip: every image twice, the second time mirrored, with the same caption
    from vae_train.tokenize import tokenize

    tokenize(str(run), str(data / "val_clip.csv"), tmp_path / "flip.pt", workers=0, progress=False, hflip=True)
    flip = torch.load(tmp_path / "flip.pt", weights_only=True)
    assert flip["tokens"].shape == (32, 16) and flip["hflip"].count(True) == 16
    pairs = {(c, f): t for c, f, t in zip(flip["images"], flip["hflip"], flip["tokens"], strict=True)}
    first = tok["images"][0]
    assert torch.equal(pairs[(first, False)], tok["tokens"][0])
    assert torch.equal(pairs[(first, True)].long(), model.encode(ds[0]["image"].flip(-1)[None])[0])
    assert flip["captions"].count(tok["captions"][0]) == 2 * tok["captions"].count(tok["captions"][0])

    r = subprocess.run([sys.executable, "-m", "vae_train", "eval", "--tokenizer", str(run), "--data",
                        str(data / "val_clip.csv"), "--grid", str(tmp_path / "grid.png")], cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["images"] == 16 and 0 < metrics["psnr"] < 100 and 0 < metrics["used_fraction"] <= 1
    assert (tmp_path / "grid.png").is_file()


TAMING = REPO / "tests" / "fixtures" / "taming_tiny"


def _broken_files(folder: Path) -> list[str]:
    """A zero-byte PNG, a text file named .png and a truncated PNG in ``folder``; their names."""
    import io

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("这不是图片\n", encoding="utf-8")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return ["empty.png", "text.png", "cut.png"]


def _listing(data: Path, tmp_path: Path, rows: list[str]) -> Path:
    """A CSV beside ``tmp_path/val`` (-> the synthetic val split): ``rows`` are val row numbers (1-based, as lines of
    val_clip.csv) or broken file names."""
    lines = (data / "val_clip.csv").read_text(encoding="utf-8").splitlines()
    if not (tmp_path / "val").exists():
        (tmp_path / "val").symlink_to(data / "val")
    path = tmp_path / f"list{len(list(tmp_path.glob('list*.csv')))}.csv"
    body = [lines[r] if isinstance(r, int) else f"坏图\t{r}" for r in rows]
    path.write_text("\n".join([lines[0], *body]) + "\n", encoding="utf-8")
    return path


def test_eval_leaves_broken_rows_out_and_names_recons_by_row(data, tmp_path, cli_fast):
    bad = _broken_files(tmp_path)
    mixed = _listing(data, tmp_path, [1, bad[0], 2, 3, bad[1], 4, 5, bad[2]])
    clean = _listing(data, tmp_path, [1, 2, 3, 4, 5])

    def evaluate(listing: Path, recon: Path) -> tuple[dict, str]:
        r = cli_fast("-m", "vae_train", "eval", "--tokenizer", str(TAMING), "--data", str(listing), "--device", "cpu",
                     "--save-recon", str(recon), "--out", str(recon) + ".json")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert json.loads(Path(str(recon) + ".json").read_text(encoding="utf-8")) == got
        return got, r.stderr

    got, err = evaluate(mixed, tmp_path / "mixed")
    want, _ = evaluate(clean, tmp_path / "clean")
    assert got["images"] == 5 and got["skipped"] == 3 and want["skipped"] == 0
    assert [Path(p).name for p in got["skipped_paths"]] == bad
    assert "skipped 3 unreadable image(s)" in err and "cover the other 5" in err
    for key in ("psnr", "ssim", "n_psnr", "used", "perplexity"):  # the broken rows count nowhere
        assert got[key] == pytest.approx(want[key]), key
    # {i}.png for each readable row i: its own reconstruction, none for a broken row
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == [f"{i}.png" for i in (0, 2, 3, 5, 6)]
    for i, j in ((0, 0), (2, 1), (3, 2), (5, 3), (6, 4)):
        assert (tmp_path / "mixed" / f"{i}.png").read_bytes() == (tmp_path / "clean" / f"{j}.png").read_bytes()
    # only broken rows within --max-images: one line, exit 2
    line = one_line_error(cli_fast("-m", "vae_train", "eval", "--tokenizer", str(TAMING), "--data",
                                   str(_listing(data, tmp_path, [bad[0], 1])), "--max-images", "1", "--device", "cpu"))
    assert "no readable image among its first 1 rows" in line


def test_every_command_refuses_a_listing_with_no_readable_image(data, tmp_path, cli_fast):
    folder = tmp_path / "bad"
    _broken_files(folder)
    (folder / "zero.jpg").write_bytes(b"")
    listing = _listing(data, tmp_path, _broken_files(tmp_path))
    commands = [
        ["eval", "--tokenizer", str(TAMING), "--data", str(folder), "--device", "cpu"],
        ["eval", "--tokenizer", str(TAMING), "--data", str(listing), "--device", "cpu"],
        ["tokenize", "--tokenizer", str(TAMING), "--data", str(folder), "--out", str(tmp_path / "t.pt"),
         "--workers", "1", "--device", "cpu"],
        [*TINY, "--train-data", str(folder), "--out-dir", str(tmp_path / "run")],
        [*TINY, "--train-data", str(tmp_path / "list0.csv"), "--random-crop", "--out-dir", str(tmp_path / "run")],
    ]
    for args in commands:
        line = one_line_error(cli_fast("-m", "vae_train", *args))
        assert "no readable image among its" in line and "listed files" in line, (args, line)
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "run").exists()


def test_tokenize_reads_webdataset_shards(data, tmp_path, cli_fast):
    import io
    import tarfile

    from form_data.export import export
    from vae_train.tokenize import tokenize

    export(data, tmp_path / "ex", splits=("val",), webdataset=True, progress=False)
    shards = tmp_path / "ex" / "wds"
    extra = [("k0", ".jpg", b"\xff\xd8 not a jpeg"), ("k0", ".txt", "坏图".encode()),
             ("k1", ".png", (data / "val_clip.csv").parent.joinpath(
                 (data / "val_clip.csv").read_text(encoding="utf-8").splitlines()[1].split("\t")[1]).read_bytes()),
             ("k1", ".txt", "好图".encode())]
    with tarfile.open(shards / "val-99999.tar", "w") as tar:  # a broken sample, then a good one
        for key, ext, blob in extra:
            info = tarfile.TarInfo(key + ext)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    r = cli_fast("-m", "vae_train", "tokenize", "--tokenizer", str(TAMING), "--data", str(shards), "--out",
                 str(tmp_path / "wds.pt"), "--workers", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["samples"] == 17
    got = torch.load(tmp_path / "wds.pt", weights_only=True)
    assert got["tokens"].shape == (17, 64) and got["skipped"] == 1 and got["captions"][-1] == "好图"
    tokenize(str(TAMING), str(data / "val_clip.csv"), tmp_path / "csv.pt", workers=0, progress=False)
    want = torch.load(tmp_path / "csv.pt", weights_only=True)
    assert torch.equal(got["tokens"][:16], want["tokens"]) and got["captions"][:16] == want["captions"]
    assert torch.equal(got["tokens"][16], want["tokens"][0])


def test_load_image_tokenizer_taming_pair_and_errors(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "taming_tiny"
    model = load_image_tokenizer(fixture / "last.ckpt", yaml_path=fixture / "model.yaml")
    assert model.num_tokens == 64 and model.encode(torch.rand(1, 3, 32, 32)).shape == (1, 64)
    assert load_image_tokenizer(fixture).num_tokens == 64  # a directory holding the pair
    with pytest.raises(UserError, match="not found"):
        load_image_tokenizer(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_image_tokenizer(bad)


def test_cli_bad_input_is_one_line_exit_2(data, tmp_path, cli, cli_fast):
    train_csv = str(data / "train_clip.csv")
    cases = [
        (["--model", "foo", "--train-data", train_csv], "--model must be dvae or vqgan"),
        ([*TINY, "--image-size", "18", "--train-data", train_csv], "not divisible"),
        ([*TINY, "--train-data", str(tmp_path / "missing.csv")], "missing.csv"),
        ([*TINY, "--train-data", train_csv, "--batch-size", "0"], "--batch-size"),
        ([*TINY, "--train-data", train_csv, "--lr", "abc"], "invalid float"),
        ([*TINY, "--train-data", train_csv, "--lr", "1e39"], "lr must be in (0, 1000]"),
        ([*TINY, "--train-data", train_csv, "--grad-clip", "nan"], "--grad-clip/--grad_clip: must be a finite number"),
        ([*TINY, "--train-data", train_csv, "--precision", "fp16", "--device", "cpu"], "fp16"),
        ([*TINY, "--train-data", train_csv, "--frobnicate"], "unrecognized"),
        ([*TINY], "--train-data is required"),
        ([*TINY, "--train-data", train_csv, "--num-tokens", "0"], "--num-tokens must be >= 1"),
        ([*TINY, "--train-data", train_csv, "--quantizer", "foo"], "bad model options"),
        (["eval", "--tokenizer", str(tmp_path / "none"), "--data", train_csv], "not found"),
        (["tokenize", "--tokenizer", str(tmp_path), "--data", train_csv, "--out", str(tmp_path / "t.pt"),
          "--batch-size", "0"],
         "must be an integer >= 1"),
        (["tokenize", "--tokenizer", str(tmp_path / "none"), "--data", train_csv, "--out", str(tmp_path / "t.pt")],
         "not found"),
    ]
    for i, (args, needle) in enumerate(cases):
        run = cli if i == 0 else cli_fast  # one real process; the rest in-process (the same main, the same wrapper)
        r = run("-m", "vae_train", *args, "--out-dir", str(tmp_path / "o")) if args[0] not in ("tokenize", "eval") \
            else run("-m", "vae_train", *args)
        assert needle in one_line_error(r), (args, r.stderr)
    assert not (tmp_path / "t.pt").exists()
    r = cli_fast("-m", "vae_train", "--help")
    assert r.returncode == 0 and "--num-tokens" in r.stdout and "--num_tokens" in r.stdout and "--resume" in r.stdout
