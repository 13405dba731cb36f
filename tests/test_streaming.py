"""Streaming webdataset shards (issue 18 part 3): shard URL lists (brace ranges, ``::`` lists, ``pipe:`` commands),
resampled readers per (rank, worker), uneven shards, and the trainer's --dataset-resampled / --train-num-samples epochs
(one process here; two torchrun ranks in the slow test)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from torch.utils.data import DataLoader

import form_data.datasets as fd
from conftest import REPO
from form_data.datasets import PipeFailed, WebDatasetShards, braceexpand, collate, expand_shards, open_dataset
from train_runtime import RuntimeConfig
from vae_train.train import VAEConfig, train
from zh_t2i_base.cli import PathArg, UserError

SIZE = 16
TINY = ["--model", "dvae", "--image-size", "16", "--num-layers", "2", "--hidden-dim", "8", "--num-resnet-blocks", "0",
        "--num-tokens", "16", "--emb-dim", "8"]


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def _write_shards(d: Path, n_shards: int = 5, per_shard: int = 4) -> Path:
    """Shard s holds keys s*100 .. s*100+per_shard-1 (the shard of a sample is index // 100)."""
    d.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(d / f"{s:05d}.tar", "w") as tar:
            for k in range(s * 100, s * 100 + per_shard):
                for name, data in ((f"{k:09d}.jpg", _jpeg(k)), (f"{k:09d}.txt", f"样本{k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return d


def _take(ds, n: int) -> list[int]:
    it = iter(ds)
    out = [next(it)["index"] for _ in range(n)]
    it.close()
    return out


@pytest.fixture
def as_worker(monkeypatch):
    """Make the dataset believe it runs in DataLoader worker ``id`` of ``num_workers``."""
    def set_worker(worker: int, workers: int) -> None:
        monkeypatch.setattr(fd, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    return set_worker


# ---------------------------------------------------------------------------------------------------------------------
# shard URL lists


def test_braceexpand():
    assert braceexpand("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert braceexpand("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    assert braceexpand("pipe:awk '{print}' f.tar") == ["pipe:awk '{print}' f.tar"]  # not a range or list: kept
    urls = expand_shards("pipe:aws s3 cp s3://bucket/{00000..09999}.tar -")
    assert len(urls) == 10_000 and urls[0] == "pipe:aws s3 cp s3://bucket/00000.tar -"
    assert urls[-1] == "pipe:aws s3 cp s3://bucket/09999.tar -"


def test_expand_lists_and_local_patterns(tmp_path):
    d = _write_shards(tmp_path / "wds", n_shards=3, per_shard=1)
    names = [str(d / f"{s:05d}.tar") for s in range(3)]
    assert expand_shards(f"{d}/{{00000..00001}}.tar::{d}/00002.tar") == names
    assert expand_shards(f"{d}::pipe:cat {d}/00000.tar") == [*names, f"pipe:cat {d}/00000.tar"]
    with pytest.raises(UserError, match="needs a command"):
        expand_shards("pipe:  ")
    with pytest.raises(UserError, match="no such shard"):
        expand_shards(f"{d}/{{00000..00003}}.tar")
    assert isinstance(open_dataset(f"pipe:cat {d}/00000.tar", image_size=SIZE), WebDatasetShards)
    assert isinstance(open_dataset(f"{d}/00000.tar::{d}/00001.tar", image_size=SIZE), WebDatasetShards)
    arg = PathArg("in", content="images", urls=True)
    for url in ("pipe:aws s3 cp s3://b/{0..9}.tar -", f"{d}/{{00000..00002}}.tar", "x.tar::y.tar", f"{d}/*.tar"):
        assert arg(url) == url  # checked when the data set opens it, not by the flag


def test_pipe_reads_like_the_file(tmp_path):
    d = _write_shards(tmp_path / "wds", n_shards=2, per_shard=3)
    local = [s["index"] for s in WebDatasetShards(d, image_size=SIZE)]
    piped = list(WebDatasetShards(f"pipe:cat {d}/{{00000..00001}}.tar", image_size=SIZE))
    assert [s["index"] for s in piped] == local == [0, 1, 2, 100, 101, 102]
    assert piped[1]["caption"] == "样本1" and piped[0]["image"].shape == (3, SIZE, SIZE)


def test_failing_pipe_names_the_url(tmp_path):
    url = f"pipe:cat {tmp_path}/missing.tar"
    with pytest.raises(PipeFailed, match=f"{url}: the command exited with status 1.*missing.tar"):
        list(WebDatasetShards(url, image_size=SIZE))
    d = _write_shards(tmp_path / "wds", n_shards=1, per_shard=2)
    with pytest.raises(PipeFailed, match="status 3"):  # the whole stream came, then the command failed
        list(WebDatasetShards(f"pipe:cat {d}/00000.tar; exit 3", image_size=SIZE))


def test_pipe_given_up_early_is_killed(tmp_path):
    d = _write_shards(tmp_path / "wds", n_shards=1, per_shard=40)  # tarfile reads 10 kB ahead: more than that
    pid_file = tmp_path / "pid"
    url = f"pipe:echo $$ > {pid_file}; cat {d}/00000.tar; sleep 60"
    assert _take(WebDatasetShards(url, image_size=SIZE), 1) == [0]
    with pytest.raises(ProcessLookupError):  # the command's shell was killed and reaped, not left to sleep
        os.kill(int(pid_file.read_text()), 0)


# ---------------------------------------------------------------------------------------------------------------------
# resampled readers, uneven shards


def test_resampled_draws_are_deterministic_per_seed_epoch_rank_worker(tmp_path, as_worker):
    d = _write_shards(tmp_path / "wds", n_shards=5, per_shard=2)

    def draws(seed=0, epoch=0, rank=0, worker=0, n=40):
        as_worker(worker, 2)
        ds = WebDatasetShards(d, image_size=SIZE, seed=seed, rank=rank, world_size=2, resampled=True)
        ds.set_epoch(epoch)
        return [i // 100 for i in _take(ds, n)[::2]]  # the shard of each drawn shard's first sample

    base = draws()
    assert base == draws() and len(set(base)) > 1  # endless (40 samples from 10), drawn with replacement
    assert max(Counter(base).values()) > 1
    others = [draws(seed=1), draws(epoch=1), draws(rank=1), draws(worker=1)]
    assert all(o != base for o in others)
    assert draws(rank=1, worker=1) == draws(rank=1, worker=1) != draws(rank=1, worker=0)


def test_uneven_shards_over_two_ranks_and_two_workers(tmp_path, as_worker):
    d = _write_shards(tmp_path / "wds", n_shards=5, per_shard=3)
    seen = Counter()
    for rank in range(2):
        for worker in range(2):
            as_worker(worker, 2)
            ds = WebDatasetShards(d, image_size=SIZE, rank=rank, world_size=2)
            ds.configure_stream(seed=3, shuffle=True, resampled=False)  # endless: goes round its shards again
            seen.update({i // 100 for i in _take(ds, 12)})  # 12 samples from 3 or 6: round and round
    assert set(seen) == set(range(5)) and sum(seen.values()) == 5  # every shard read by exactly one reader
    # finite (no repeat): all 15 samples once over the 4 readers
    total = Counter()
    for rank in range(2):
        for worker in range(2):
            as_worker(worker, 2)
            total.update(s["index"] for s in WebDatasetShards(d, image_size=SIZE, rank=rank, world_size=2))
    assert total == Counter({s * 100 + k: 1 for s in range(5) for k in range(3)})


def test_resampled_stream_through_two_dataloader_workers(tmp_path):
    d = _write_shards(tmp_path / "wds", n_shards=5, per_shard=3)

    def batches(epoch):
        ds = WebDatasetShards(d, image_size=SIZE, rank=0, world_size=1)
        ds.configure_stream(seed=0, shuffle=True, resampled=True)
        ds.set_epoch(epoch)
        it = iter(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate))
        out = [next(it)["index"].tolist() for _ in range(8)]
        del it
        return out

    first = batches(0)
    assert first == batches(0) != batches(1)


def test_shuffle_buffer_keeps_every_sample(tmp_path):
    d = _write_shards(tmp_path / "wds", n_shards=2, per_shard=5)
    plain = [s["index"] for s in WebDatasetShards(d, image_size=SIZE)]
    mixed = [s["index"] for s in WebDatasetShards(d, image_size=SIZE, shuffle_buffer=4)]
    assert sorted(mixed) == sorted(plain) and mixed != plain


# ---------------------------------------------------------------------------------------------------------------------
# the trainer


def _vc(data: str) -> VAEConfig:
    return VAEConfig(model="dvae", train_data=data, image_size=16, num_layers=2, hidden_dim=8, num_resnet_blocks=0,
                     num_tokens=16, emb_dim=8)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_trainer_refuses_bad_combinations(tmp_path):
    d = _write_shards(tmp_path / "wds", n_shards=2, per_shard=2)
    listing = tmp_path / "list.csv"
    listing.write_text("title\tfilepath\n" + "".join(f"图{i}\tx{i}.jpg\n" for i in range(4)), encoding="utf-8")
    for i in range(4):
        (tmp_path / f"x{i}.jpg").write_bytes(_jpeg(i))
    cases = [(str(d), {}, "give --train-num-samples"),
             (str(d), {"train_num_samples": 3, "batch_size": 4}, "less than one step"),
             (str(listing), {"dataset_resampled": True}, "--dataset-resampled is for webdataset shards"),
             (str(listing), {"train_num_samples": 8}, "--train-num-samples is for webdataset shards")]
    for data, kw, message in cases:
        run = tmp_path / f"run{len(message)}"
        with pytest.raises(UserError, match=message):
            train(_vc(data), RuntimeConfig(out_dir=str(run), max_steps=2, batch_size=kw.pop("batch_size", 2),
                                           workers=0, **kw))
        assert not run.exists()


def test_stream_epochs_samples_and_resume(tmp_path):
    d = _write_shards(tmp_path / "wds", n_shards=5, per_shard=3)
    run = tmp_path / "run"

    def rc(max_steps: int, **kw) -> RuntimeConfig:
        return RuntimeConfig(out_dir=str(run), max_steps=max_steps, batch_size=2, workers=0, log_every=1,
                             save_every=3, dataset_resampled=True, train_num_samples=9, **kw)  # 4 steps an epoch

    assert train(_vc(f"pipe:cat {d}/{{00000..00004}}.tar"), rc(6))["step"] == 6
    rows = [r for r in _rows(run) if "samples_seen" in r]
    assert [(r["step"], r["epoch"], r["samples_seen"]) for r in rows] == [
        (s, (s - 1) // 4, 2 * s) for s in range(1, 7)]  # an epoch's last step still logs that epoch
    train(_vc(str(d)), rc(9, resume="latest"))
    rows = [r for r in _rows(run) if "samples_seen" in r]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["samples_seen"] for r in rows] == [2 * s for s in range(1, 10)]
    assert rows[-1]["epoch"] == 2


@pytest.mark.slow
def test_torchrun_two_ranks_resampled_uneven_shards(tmp_path):
    d = _write_shards(tmp_path / "wds", n_shards=5, per_shard=4)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "vae_train", *TINY, "--train-data", f"{d}/{{00000..00004}}.tar", "--workers", "2",
                        "--dataset-resampled", "--train-num-samples", "13", "--batch-size", "2", "--max-steps", "7",
                        "--log-every", "1", "--out-dir", str(run)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == 7 and result["rank_param_max_diff"] == 0.0
    rows = [x for x in _rows(run) if "samples_seen" in x]
    # 13 // (2 x 2) = 3 steps an epoch; every step takes 2 samples on each of the 2 ranks
    assert [(x["step"], x["epoch"]) for x in rows] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1), (7, 2)]
    assert [x["samples_seen"] for x in rows] == [4 * s for s in range(1, 8)]
