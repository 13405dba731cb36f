"""k-means for the Styled-VQ codebook: ours (styled_vq.kmeans) against the original Styled_vae_vq algorithm.

Baseline (re-implemented here from the description in the spec, on one process): Lloyd iterations that assign in
chunks of 8,192 vectors by squared L2 (|x|^2 + |c|^2 - 2 x.c, argmin) and then update the centres in a Python loop
over the K centres (nonzero(labels == j), index_select, mean; the original also all-reduced each centre, which costs
nothing on one process). It runs a fixed 51 iterations. Being slow, it is timed on ``--baseline-iters`` iterations
and extrapolated per iteration; its centres after one iteration are checked against ours from the same start.

Ours: the same exact Lloyd iterations (same start), count-weighted updates, bound-based pruning; timed until a fixed
point (or 51 iterations), and to its tol stop; then ours as the CLI runs it, with a warm start on a sample of
``--warm-start`` x K vectors. Also scikit-learn's MiniBatchKMeans from the same start, for the library choice.

    python bench/bench_kmeans.py                       # 1M x 128, K = 4096, clustered data
    python bench/bench_kmeans.py --data normal --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from styled_vq.kmeans import kmeans
from vae_train.styled import nearest

ORIGINAL_ITERS = 51  # the original loops until iteration > 50


def make_data(kind: str, n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, dim, generator=g)
    means = torch.randn(8192, dim, generator=g)  # clustered: 8,192 Gaussian blobs of std 0.25 around N(0, I) means
    return means[torch.randint(0, means.shape[0], (n,), generator=g)] + 0.25 * torch.randn(n, dim, generator=g)


def original_iteration(x: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    c_sq = (centres * centres).sum(1)
    labels = torch.cat([((x[s:s + chunk] * x[s:s + chunk]).sum(1, keepdim=True) + c_sq
                         - 2 * x[s:s + chunk] @ centres.T).argmin(1) for s in range(0, x.shape[0], chunk)])
    new = centres.clone()
    for j in range(centres.shape[0]):
        members = torch.nonzero(labels == j).squeeze(1)
        new[j] = x.index_select(0, members).mean(0)  # NaN for an empty cluster, as in the original
    return new


def inertia(x: torch.Tensor, centres: torch.Tensor) -> float:
    return float((x - centres[nearest(x, centres)]).pow(2).sum(1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--data", choices=("clustered", "normal"), default="clustered")
    p.add_argument("--baseline-iters", type=int, default=2)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--minibatch-epochs", type=int, default=3)
    p.add_argument("--iters", type=int, default=ORIGINAL_ITERS, help="most iterations of ours")
    p.add_argument("--warm-start", type=int, default=64, help="ours also with a warm start on this many x K vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args()

    x = make_data(a.data, a.n, a.dim, a.seed)
    g = torch.Generator().manual_seed(a.seed + 1)
    init = x[torch.randperm(a.n, generator=g)[: a.k]].clone()
    print(f"data: {a.n:,} x {a.dim} ({a.data}), K = {a.k}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    t = time.perf_counter()
    base, first = init, None
    for _ in range(a.baseline_iters):
        base = original_iteration(x, base)
        first = base if first is None else first
    base_per_iter = (time.perf_counter() - t) / a.baseline_iters
    print(f"original algorithm: {base_per_iter:.2f} s/iteration (timed on {a.baseline_iters} iterations; "
          f"{ORIGINAL_ITERS} iterations extrapolated: {base_per_iter * ORIGINAL_ITERS:.0f} s)", flush=True)

    check = kmeans(x, a.k, iters=1, tol=0, init=init)
    same = float((check.centres - first).abs().max())
    print(f"ours vs original after 1 iteration from the same start: max |centre difference| = {same:.2e}", flush=True)

    ours = kmeans(x, a.k, iters=a.iters, tol=0, init=init, progress=True)
    ours_total = ours.history[-1]["seconds"]
    ours_per_iter = ours_total / ours.iterations
    searched = [round(h["searched"], 3) for h in ours.history]
    how = "a fixed point (no centre moves)" if ours.converged else "its iteration limit"
    print(f"ours: {ours_per_iter:.2f} s/iteration averaged over {ours.iterations} iterations ({ours_total:.0f} s, "
          f"stopped at {how}); vectors searched per iteration: {searched}", flush=True)
    warm = kmeans(x, a.k, iters=a.iters, tol=a.tol, init=None if a.warm_start else init, warm_start=a.warm_start,
                  seed=a.seed)
    warm_s = warm.history[-1]["seconds"]
    print(f"ours with warm start ({a.warm_start} x K sampled vectors, tol {a.tol}): {warm.warm_start_iterations} "
          f"iterations on the sample + {warm.iterations} on all vectors, {warm_s:.0f} s, inertia {warm.inertia:.4f}",
          flush=True)
    mean_var = float(x.var(0).mean())
    stop = next((i for i, h in enumerate(ours.history) if h["shift"] <= a.tol * mean_var), None)
    tol_seconds = ours.history[stop]["seconds"] if stop is not None else None

    from sklearn.cluster import MiniBatchKMeans

    t = time.perf_counter()
    mbk = MiniBatchKMeans(a.k, init=init.numpy(), n_init=1, batch_size=4096, max_iter=a.minibatch_epochs,
                          random_state=a.seed, compute_labels=False).fit(x.numpy())
    mbk_seconds = time.perf_counter() - t
    mbk_inertia = inertia(x, torch.from_numpy(mbk.cluster_centers_).float())
    beat = next((h for h in ours.history if h["inertia"] <= mbk_inertia), None)

    figures = {
        "n": a.n, "dim": a.dim, "k": a.k, "data": a.data, "threads": torch.get_num_threads(),
        "baseline_s_per_iter": base_per_iter, "baseline_iters_timed": a.baseline_iters,
        "baseline_51_iters_s_extrapolated": base_per_iter * ORIGINAL_ITERS,
        "ours_iterations": ours.iterations, "ours_fixed_point": ours.converged, "ours_s": ours_total,
        "ours_s_per_iter": ours_per_iter, "ours_searched_fraction": searched,
        "ratio_per_iter": base_per_iter / ours_per_iter,
        "ours_tol": a.tol, "ours_tol_stop_iteration": None if stop is None else stop + 1,
        "ours_tol_stop_s": tol_seconds,
        "ratio_original_51_iters_vs_ours_to_tol": None if tol_seconds is None else
        base_per_iter * ORIGINAL_ITERS / tol_seconds,
        "max_centre_diff_vs_baseline_after_1_iter": same,
        "inertia_history_ours": [h["inertia"] for h in ours.history],
        "minibatch_epochs": a.minibatch_epochs, "minibatch_s": mbk_seconds, "inertia_minibatch": mbk_inertia,
        "ours_s_to_minibatch_inertia": None if beat is None else beat["seconds"],
        "warm_start": a.warm_start, "warm_iterations_sample": warm.warm_start_iterations,
        "warm_iterations_all": warm.iterations, "warm_s": warm_s, "warm_inertia": warm.inertia,
        "ratio_original_51_iters_vs_ours_warm": base_per_iter * ORIGINAL_ITERS / warm_s,
    }
    print(f"ratio (original / ours) per exact Lloyd iteration: {figures['ratio_per_iter']:.1f}x (target >= 10x)")
    if tol_seconds is not None:
        print(f"job: ours reaches tol {a.tol} after {stop + 1} iterations, {tol_seconds:.0f} s; the original runs a "
              f"fixed {ORIGINAL_ITERS} iterations, {base_per_iter * ORIGINAL_ITERS:.0f} s (extrapolated): "
              f"{figures['ratio_original_51_iters_vs_ours_to_tol']:.1f}x")
    print(f"job with warm start: original {base_per_iter * ORIGINAL_ITERS:.0f} s (51 iterations, extrapolated) vs ours "
          f"{warm_s:.0f} s: {figures['ratio_original_51_iters_vs_ours_warm']:.1f}x (inertia {warm.inertia:.4f} vs "
          f"{ours.inertia:.4f} for exact Lloyd from the original's start)")
    reached = "never" if beat is None else f"{beat['seconds']:.0f} s"
    print(f"inertia (mean squared distance, all vectors): start {inertia(x, init):.4f}, ours at the end "
          f"{ours.inertia:.4f}; MiniBatchKMeans ({a.minibatch_epochs} epochs, batch 4096, same start) "
          f"{mbk_inertia:.4f} "
          f"in {mbk_seconds:.0f} s; ours reached that after {reached}")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
