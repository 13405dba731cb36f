"""Exact Lloyd k-means in torch: vectorised, distributed, count-weighted, with triangle-inequality pruning.

Every process passes its own shard of the vectors (any size, empty too); with a ``torch.distributed`` process group
the result is the k-means of the union of the shards, the same as one process on the concatenation:

* initialisation: K distinct vectors drawn uniformly from ALL shards (seeded), gathered onto every rank;
* update: per-centre sums and counts are all-reduced, so every vector weighs the same whatever its shard's size;
* empty clusters are re-seeded with the vectors farthest from their centres (over all shards), never NaN;
* stop: after ``iters`` updates, or once the total squared centre shift is <= ``tol`` x the data's mean variance
  (scikit-learn's rule; with ``tol=0`` at a fixed point, where further iterations would change nothing).

Assignments are exact (up to float rounding, as for any GEMM-based k-means) but most distance computations are
skipped once the centres settle: the centres are split into groups, and each vector keeps the exact distance to its
centre and a lower bound on its distance to every group ("Yinyang" k-means, Ding et al. 2015); a group is only
searched when its bound, loosened by how far the group's centres moved, falls below the distance to the own centre.
Memory beyond the data: 4 * (groups + 2) bytes per vector.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import load_torch


@dataclass
class KMeansResult:
    centres: Tensor  # [K, D] float32
    counts: Tensor  # [K] vectors assigned to each centre (all shards) at the last assignment
    inertia: float  # mean squared distance of the vectors to their (last assigned, updated) centres, all shards
    iterations: int
    converged: bool
    # per iteration: total squared centre shift, re-seeded centres, fraction of vectors searched, seconds so far
    # (warm start included), inertia (mean squared distance to the assigned, updated centres)
    history: list[dict] = field(default_factory=list)
    warm_start_iterations: int = 0  # iterations of the warm start on a sample


_BLOCK = 1 << 16  # vectors per step of the O(N x D) passes (centre sums, distances to the own centres)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_sum(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _sq_dist(x: Tensor, x_sq: Tensor, c: Tensor, c_sq: Tensor) -> Tensor:
    """Squared L2 distances [n, k] = |x|^2 + |c|^2 - 2 x.c, clamped at 0."""
    return torch.addmm(x_sq[:, None] + c_sq[None], x, c.T, alpha=-2).clamp_min_(0)


def _global_sample(x: Tensor, count: int, seed: int) -> tuple[Tensor, int]:
    """``count`` distinct vectors drawn uniformly from all shards (the shards in rank order make one list; the same
    draw on every rank): this rank's rows of the draw and their position in it."""
    sizes = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    if _distributed():
        gathered = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, sizes)
        sizes = torch.cat(gathered)
    total = int(sizes.sum())
    if total < count:
        raise UserError(f"k-means needs at least k = {count} vectors, got {total}")
    start = int(sizes[: dist.get_rank()].sum()) if _distributed() else 0
    picks = torch.tensor(sorted(random.Random(seed).sample(range(total), count)), dtype=torch.long, device=x.device)
    mine = (picks >= start) & (picks < start + x.shape[0])
    return picks[mine] - start, int((picks < start).sum())


def _init_centres(x: Tensor, k: int, seed: int) -> Tensor:
    """K distinct vectors drawn uniformly from all shards, the same on every rank."""
    rows, offset = _global_sample(x, k, seed)
    centres = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    centres[offset:offset + rows.numel()] = x[rows].double()
    return _all_sum(centres).float()


def _group_centres(centres: Tensor, groups: int, seed: int) -> Tensor:
    """A permutation of the centres that puts nearby centres next to each other: a few Lloyd steps over the centres
    themselves, then the centres sorted by their group (the caller cuts the order into equal blocks)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    seeds = centres[torch.randperm(centres.shape[0], generator=g)[:groups].to(centres.device)].clone()
    c_sq = (centres * centres).sum(1)
    gid = torch.zeros(centres.shape[0], dtype=torch.long, device=centres.device)
    for _ in range(5):
        gid = _sq_dist(centres, c_sq, seeds, (seeds * seeds).sum(1)).argmin(1)
        sums = torch.zeros_like(seeds).index_add_(0, gid, centres)
        n = torch.bincount(gid, minlength=groups).to(seeds.dtype)
        seeds = torch.where(n[:, None] > 0, sums / n.clamp_min(1)[:, None], seeds)
    return torch.argsort(gid, stable=True)


class _Yinyang:
    """State of one shard: assignment, exact distance to the own centre, a lower bound per centre group.

    The centres are kept in group order and the groups are equal blocks of ``size`` centres, so the distances of a
    block of vectors to all centres (one GEMM) reduce to per-group minima with a reshape.
    """

    def __init__(self, x: Tensor, centres: Tensor, groups: int, seed: int, chunk_elements: int):
        self.x = x
        self.x_sq = (x * x).sum(1)
        self.k = centres.shape[0]
        self.groups = max(d for d in range(1, min(groups, self.k) + 1) if self.k % d == 0)
        self.size = self.k // self.groups
        self.perm = _group_centres(centres, self.groups, seed) if self.groups > 1 else torch.arange(
            self.k, device=x.device)
        if _distributed():  # identical grouping on every rank whatever the device's float behaviour
            dist.broadcast(self.perm, 0)
        self.rows = max(1, chunk_elements // self.k)
        n = x.shape[0]
        self.assign = torch.zeros(n, dtype=torch.long, device=x.device)
        self.dist = torch.full((n,), math.inf, device=x.device)
        self.lower = torch.zeros(n, self.groups, device=x.device)

    def search(self, centres: Tensor) -> float:
        """Exact nearest centres for the vectors whose bounds allow a change; returns the fraction searched."""
        c_sq = (centres * centres).sum(1)
        todo = torch.nonzero(self.dist > self.lower.min(1).values).squeeze(1)
        for s in range(0, todo.numel(), self.rows):
            rows = todo[s:s + self.rows]
            n = rows.numel()
            # |c|^2 - 2 x.c: the squared distance minus |x|^2, which no minimum over centres depends on
            d = torch.addmm(c_sq, self.x.index_select(0, rows), centres.T, alpha=-2).view(n, self.groups, self.size)
            m1, i1 = d.min(2)  # per group
            best, g = m1.min(1)
            arange = torch.arange(n, device=d.device)
            own_in_group = i1[arange, g]
            # lower bounds exclude the own centre: its group gets the second smallest distance
            own_group = d[arange, g]
            own_group[arange, own_in_group] = math.inf
            m1[arange, g] = own_group.min(1).values
            x_sq = self.x_sq[rows]
            self.assign[rows] = g * self.size + own_in_group
            self.dist[rows] = (best + x_sq).clamp_min_(0).sqrt_()
            self.lower[rows] = (m1 + x_sq[:, None]).clamp_min_(0).sqrt_()
        return todo.numel() / max(1, self.x.shape[0])

    def refresh(self, centres: Tensor, drift: Tensor) -> None:
        """After an update: exact distances to the own (moved) centres, lower bounds loosened by group drift."""
        self.lower.sub_(drift.view(self.groups, self.size).amax(1)[None]).clamp_min_(0)
        for s in range(0, self.x.shape[0], _BLOCK):
            diff = self.x[s:s + _BLOCK] - centres[self.assign[s:s + _BLOCK]]
            self.dist[s:s + _BLOCK] = diff.pow_(2).sum(1).sqrt_()


def _reseed(centres: Tensor, empty: Tensor, state: _Yinyang) -> None:
    """Move the empty centres onto the vectors farthest from their own centres (over all shards)."""
    m = int(empty.numel())
    far = min(m, state.x.shape[0])
    d, rows = state.dist.topk(far) if far else (state.dist[:0], state.assign[:0])
    cand = torch.full((m, centres.shape[1] + 1), -math.inf, device=centres.device)
    cand[:far, 0], cand[:far, 1:] = d, state.x[rows]
    if _distributed():
        gathered = [torch.empty_like(cand) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, cand)
        cand = torch.cat(gathered)
    top = cand[cand[:, 0].argsort(descending=True, stable=True)[:m]]
    top = top[torch.isfinite(top[:, 0])]
    centres[empty[:top.shape[0]]] = top[:, 1:]


def kmeans(x: Tensor, k: int, iters: int = 50, tol: float = 1e-4, seed: int = 0, groups: int = 0,
           init: Tensor | None = None, warm_start: int = 0, chunk_elements: int = 1 << 25,
           progress: bool = False) -> KMeansResult:
    """k-means of this rank's vectors ``x`` [N, D] (and the other ranks' shards under torch.distributed).

    ``groups``: centre groups for pruning (0: min(64, max(1, k // 32)); 1 is Hamerly-like, cheapest in memory).
    ``init``: starting centres [k, D] (the same on every rank) instead of the seeded draw.
    ``warm_start``: first run k-means on ``warm_start`` x k vectors drawn from all shards and start from its centres
    (cheap iterations while the centres move a lot; 0 = off, or when that is not fewer than all vectors).
    ``chunk_elements``: the most distances held at once. Runs on ``x``'s device.
    """
    if k < 1 or iters < 1 or tol < 0:
        raise UserError(f"k-means needs k >= 1, iters >= 1 and tol >= 0 (got {k}, {iters}, {tol})")
    if x.ndim != 2:
        raise UserError(f"k-means expects vectors [N, D], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise UserError("k-means input holds NaN/inf values")
    x = x.float().contiguous()
    dim = torch.tensor([x.shape[1]], device=x.device)
    if _distributed():
        dims = [torch.zeros_like(dim) for _ in range(dist.get_world_size())]
        dist.all_gather(dims, dim)
        if len({int(d) for d in dims}) != 1:
            raise UserError(f"the shards have different vector sizes: {[int(d) for d in dims]}")
    groups = groups or min(64, max(1, k // 32))
    t0 = time.perf_counter()
    warm = None
    if warm_start > 0 and init is None:
        n_total = int(_all_sum(torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))[0])
        if warm_start * k < n_total:
            rows, _ = _global_sample(x, warm_start * k, seed + 1)
            warm = kmeans(x[rows], k, iters, tol, seed, groups, chunk_elements=chunk_elements, progress=progress)
            init = warm.centres
    if init is not None:
        if init.shape != (k, x.shape[1]):
            raise UserError(f"k-means init must have shape [{k}, {x.shape[1]}], got {tuple(init.shape)}")
        centres = init.to(x.device, torch.float32).clone()
    else:
        centres = _init_centres(x, k, seed)
    tol_abs = tol * _mean_variance(x)
    state = _Yinyang(x, centres, min(groups, k), seed, chunk_elements)
    centres = centres[state.perm]
    history: list[dict] = []
    converged = False
    bar = tqdm(range(iters), desc="k-means", unit="it", disable=not progress)
    for _ in bar:
        searched = state.search(centres)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[0], _BLOCK):  # float64 sums (index_put_ is far faster than index_add_ on CPU)
            sums.index_put_((state.assign[s:s + _BLOCK],), x[s:s + _BLOCK].double(), accumulate=True)
        counts = _all_sum(torch.bincount(state.assign, minlength=k).double())
        sums = _all_sum(sums)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres.double()).float()
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():
            _reseed(new, empty, state)
        drift = (new - centres).norm(dim=1)
        shift = float((drift * drift).sum())
        centres = new
        history.append({"shift": shift, "reseeded": int(empty.numel()), "searched": searched,
                        "seconds": time.perf_counter() - t0})
        bar.set_postfix(shift=f"{shift:.3g}", searched=f"{searched:.3f}")
        state.refresh(centres, drift)
        history[-1]["inertia"] = float(_all_sum((state.dist.double() ** 2).sum()[None])[0] / counts.sum())
        if shift <= tol_abs:
            converged = True
            break
    final_counts = _all_sum(torch.bincount(state.assign, minlength=k).double())
    back = torch.argsort(state.perm)  # the caller's centre order (the init order)
    return KMeansResult(centres=centres[back], counts=final_counts.long()[back], inertia=history[-1]["inertia"],
                        iterations=len(history), converged=converged, history=history,
                        warm_start_iterations=0 if warm is None else warm.iterations)


def _mean_variance(x: Tensor) -> float:
    """Mean over dimensions of the variance of the vectors of all shards (float64, chunked)."""
    acc = torch.zeros(2, x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], _BLOCK):
        part = x[s:s + _BLOCK].double()
        acc[0] += part.sum(0)
        acc[1] += (part * part).sum(0)
    n = _all_sum(torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device))
    acc = _all_sum(acc)
    return float((acc[1] / n - (acc[0] / n) ** 2).mean())


def load_shards(paths: list[Path], rank: int, world: int, dim: int) -> Tensor:
    """The feature vectors of this rank's share of the shard files (a contiguous block of the sorted list, so that
    the vectors of all ranks in rank order are those of all files in order), as [N, dim]."""
    files = sorted(paths)
    mine = files[rank * len(files) // world:(rank + 1) * len(files) // world]
    parts = []
    for p in mine:
        obj = load_torch(p, "feature shard")
        feats = obj.get("features") if isinstance(obj, dict) else None
        if not isinstance(feats, Tensor) or feats.ndim != 3:
            raise UserError(f"{p}: not a feature shard of `python -m styled_vq dump` (no [N, T, E] 'features')")
        if feats.shape[-1] != dim:
            raise UserError(f"{p}: tokens of size {feats.shape[-1]}, expected {dim}")
        parts.append(feats.reshape(-1, dim).float())
    return torch.cat(parts) if parts else torch.zeros(0, dim)


def load_centres(path: str | os.PathLike) -> Tensor:
    """k-means centres from a file: our ``{"centres": [K, E]}`` or a bare tensor (the original's ``k_means.pt``)."""
    obj = load_torch(path, "codebook file")
    centres = obj.get("centres") if isinstance(obj, dict) else obj
    if not isinstance(centres, Tensor) or centres.ndim != 2:
        raise UserError(f"{path}: expected a [K, emb_dim] tensor or a dict with 'centres'")
    return centres.float()
