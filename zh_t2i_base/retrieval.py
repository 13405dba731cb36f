"""Retrieval metrics, one way for every evaluation (CLIP's and BriVL's).

A query's candidates are sorted by descending score, ties broken by the lower candidate index (a stable sort), so a
result never depends on sort order or on how scores happen to tie. Its 0-based rank is the position of its first
positive in that order: the number of candidates scoring higher than its best positive, plus the tied ones with a
lower index. From the ranks: ``R@K`` = % of queries ranked below K; ``mean_recall`` = the mean of the ``R@K``
(Chinese-CLIP's mean recall over K = 1, 5, 10); ``median_rank`` = floor(median(rank)) + 1 (1-based, as open_clip);
``mean_rank`` = mean(rank) + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)


def ranks(queries: np.ndarray, candidates: np.ndarray, positive: np.ndarray | None = None,
          chunk: int = 1024) -> np.ndarray:
    """0-based rank of each query's first positive among ``candidates`` (scores ``queries @ candidates.T``, computed
    ``chunk`` queries at a time). ``positive`` [Q, N] bool marks every correct candidate; None: candidate i for
    query i. A query without a positive gets rank N."""
    q, c = np.asarray(queries), np.asarray(candidates)
    n = len(c)
    cols = np.arange(n)
    out = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):
        rows = np.arange(start, min(start + chunk, len(q)))
        s = q[rows] @ c.T
        pos = cols[None, :] == rows[:, None] if positive is None else np.asarray(positive[rows], dtype=bool)
        best = np.where(pos, s, -np.inf).max(axis=1, initial=-np.inf)
        first = np.argmax(pos & (s == best[:, None]), axis=1)  # the lowest index among the best positives
        r = (s > best[:, None]).sum(1) + ((s == best[:, None]) & (cols[None, :] < first[:, None])).sum(1)
        out[rows] = np.where(pos.any(axis=1), r, n)
    return out


def recall_metrics(rank: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """``{"R@K": %, ..., "mean_recall": %, "median_rank": ..., "mean_rank": ...}`` of 0-based ranks."""
    r = np.asarray(rank, dtype=np.float64)
    out = {f"R@{k}": float((r < k).mean() * 100) for k in ks}
    out["mean_recall"] = float(np.mean([out[f"R@{k}"] for k in ks]))
    out["median_rank"] = float(np.floor(np.median(r)) + 1)
    out["mean_rank"] = float(r.mean() + 1)
    return out
