"""The one definition of a kNN score: a float64 inner product of the stored float32 rows, rounded to float32."""

from __future__ import annotations

import numpy as np

# query rows re-scored per einsum call: keeps the gathered (rows, width, d) candidate block small (~10 MB).
RESCORE_ROWS = 32


def exact_scores(rows: np.ndarray, q: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Scores (b, w) float32 of query `q[i]` against `rows[labels[i, j]]`, -inf where a label is -1 (padding).

    Products of float32 numbers are exact in float64 and their sum over d is taken in one fixed order whatever the
    shapes, so a pair gets the same score in every shard layout, batch size and engine (BLAS and SIMD paths would
    not agree to the last bit)."""
    out = np.full(labels.shape, -np.inf, np.float32)
    for s in range(0, labels.shape[0], RESCORE_ROWS):
        lab = labels[s : s + RESCORE_ROWS]
        valid = lab >= 0
        cand = rows[np.where(valid, lab, 0)]
        exact = np.einsum("cd,ckd->ck", q[s : s + RESCORE_ROWS], cand, dtype=np.float64, casting="safe")
        out[s : s + RESCORE_ROWS] = np.where(valid, exact.astype(np.float32), -np.inf)
    return out


def padded_labels(rows: np.ndarray, cols: np.ndarray, b: int) -> np.ndarray:
    """(b, w) labels from the hits (rows[i], cols[i]) grouped by row (row-major, as np.nonzero gives them): row r
    holds its hits' cols in order, padded with -1 (w >= 1)."""
    counts = np.bincount(rows, minlength=b)
    labels = np.full((b, max(int(counts.max(initial=0)), 1)), -1, np.int64)
    labels[rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)] = cols
    return labels


def keep_top(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Of each row's candidates (`labels`, -1 for padding, with their exact `scores`), every one scoring at least
    the row's k-th: (scores, labels) (b, w), w the most any row keeps, in no particular order, padded with -inf and
    -1. Ties at the k-th all stay: which of them make the top k is decided by id, where the shards are merged."""
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    keep = (scores >= kth[:, None]) & (labels >= 0)
    w = max(int(keep.sum(axis=1).max(initial=0)), 1)
    ranked = np.where(keep, -scores, np.inf)  # kept first; their order is merge_topk's business
    order = np.argpartition(ranked, w - 1, axis=1)[:, :w] if w < ranked.shape[1] else np.argsort(ranked, axis=1)
    return (np.take_along_axis(np.where(keep, scores, -np.inf).astype(np.float32), order, axis=1),
            np.take_along_axis(np.where(keep, labels, -1), order, axis=1))
