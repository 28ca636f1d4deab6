"""Retrieval metrics as NewsImages scores them: MRR@k and Recall@K over all queries."""

from __future__ import annotations

import numpy as np

RECALL_KS = (5, 10, 20, 50, 100)


def ranks_of_truth(ranked_ids: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1-based rank of each query's true id in its ranked row, 0 where it is absent."""
    ranked_ids = np.asarray(ranked_ids, dtype=object)
    if ranked_ids.ndim != 2 or len(ranked_ids) != len(truth):
        raise ValueError(f"ranked ids must be (queries, k) with one row per truth; got {ranked_ids.shape} "
                         f"for {len(truth)} truths")
    hits = ranked_ids == np.asarray(truth, dtype=object)[:, None]
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1) + 1, 0)


def scores(ranks: np.ndarray, k: int = 100, recall_ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """MRR@k (a query whose truth is not in its top k scores 0) and Recall@K as fractions, over all queries."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        raise ValueError("no queries to score")
    within = (ranks > 0) & (ranks <= k)
    reciprocal = np.where(within, 1.0 / np.maximum(ranks, 1), 0.0)
    result = {"n": int(len(ranks)), "mrr": float(reciprocal.mean())}
    for cut in recall_ks:
        result[f"recall@{cut}"] = float(((ranks > 0) & (ranks <= min(cut, k))).mean())
    return result
