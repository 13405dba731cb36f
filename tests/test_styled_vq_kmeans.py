"""Styled-VQ k-means: equal to scikit-learn's Lloyd from the same start (with and without pruning), no NaN with empty
clusters, tol stop, and under torchrun (2 ranks, unequal shards, one rank too small to seed alone) the same codebook as
one process on the union - i.e. count-weighted updates and initialisation from all shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from conftest import REPO, one_line_error
from styled_vq.kmeans import kmeans
from zh_t2i_base.cli import UserError


def blobs(n: int, k: int, dim: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(k, dim, generator=g)
    return means[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("groups", [1, 4, 32])
def test_equals_scikit_learn_lloyd_from_the_same_start(groups):
    x = blobs(3000, 40, 8, seed=0)
    init = x[torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:32]].clone()
    for iters in (1, 4, 25):
        ref = KMeans(32, init=init.double().numpy(), n_init=1, max_iter=iters, tol=0, algorithm="lloyd")
        ref.fit(x.double().numpy())
        ours = kmeans(x, 32, iters=iters, tol=0, init=init, groups=groups)
        assert ours.iterations <= iters  # it stops early only at a fixed point (shift 0)
        assert np.abs(ours.centres.numpy() - ref.cluster_centers_).max() < 1e-4
    assert ours.history[-1]["searched"] < 0.5  # the bounds skip most vectors once the centres settle
    assert int(ours.counts.sum()) == 3000 and abs(ours.inertia - ref.inertia_ / 3000) < 1e-3 * ref.inertia_ / 3000


def test_empty_clusters_are_reseeded_never_nan():
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat(100, 1)  # 3 distinct points, K = 5
    init = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [10.0, 0.0], [0.0, 10.0]])
    r = kmeans(x, 5, iters=5, tol=0, init=init)
    assert torch.isfinite(r.centres).all() and int(r.counts.sum()) == 300
    assert r.history[0]["reseeded"] == 2  # two centres lost every member in the first update
    assert {tuple(c) for c in r.centres[r.counts > 0].round().tolist()} == {(0.0, 0.0), (10.0, 0.0), (0.0, 10.0)}
    spread = blobs(400, 4, 3, seed=2)
    far = torch.cat([spread[:3], torch.full((5, 3), 1e3)])  # 5 centres that catch nothing at first
    r = kmeans(spread, 8, iters=10, tol=0, init=far)
    assert r.history[0]["reseeded"] == 5 and torch.isfinite(r.centres).all() and (r.counts > 0).all()


def test_tol_stop_and_bad_input():
    x = blobs(2000, 8, 4, seed=3, spread=10.0)
    r = kmeans(x, 8, iters=100, tol=1e-4, seed=0)
    assert r.converged and r.iterations < 100
    with pytest.raises(UserError, match="at least k"):
        kmeans(x[:5], 8)
    with pytest.raises(UserError, match="NaN"):
        kmeans(torch.full((10, 2), float("nan")), 2)


def _shard(path, feats: torch.Tensor) -> str:
    torch.save({"features": feats, "index": torch.arange(feats.shape[0])}, path)
    return path.name


@pytest.mark.slow
def test_torchrun_unequal_shards_equal_one_process(tmp_path, cli):
    # tokens [N, T=2, E=3] in shards of 4, 300 and 37 images: the ranks hold 608 and 74 vectors, so the original's
    # unweighted average of per-rank means would be far off (and NaN for a cluster with no member on a rank)
    x = blobs(341 * 2, 6, 3, seed=4).view(341, 2, 3)
    feats = tmp_path / "feats"
    feats.mkdir()
    names = [_shard(feats / f"features-{i:05d}-of-00003.pt", part) for i, part in enumerate(x.split([4, 300, 37]))]
    (feats / "meta.json").write_text(json.dumps({"emb_dim": 3, "seq_len": 2, "shards": names}))
    args = ["kmeans", "--features", str(feats), "--k", "12", "--iters", "30", "--tol", "0", "--device", "cpu"]
    r = cli("-m", "styled_vq", *args, "--out", str(tmp_path / "one.pt"))
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "styled_vq", *args, "--out", str(tmp_path / "two.pt")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert two["vectors"] == 682 and torch.equal(one["counts"], two["counts"])
    assert torch.allclose(one["centres"], two["centres"], atol=1e-5)
    assert torch.isfinite(two["centres"]).all()  # rank 0 reads shards 0-1 (608 vectors), rank 1 shard 2 (74)
    big = cli("-m", "styled_vq", "kmeans", "--features", str(feats), "--k", "5000", "--out", str(tmp_path / "x.pt"))
    assert "at least k = 5000 vectors, got 682" in one_line_error(big)
    assert not (tmp_path / "x.pt").exists()
