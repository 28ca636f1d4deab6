"""Exact top-k of a batch of queries against one matrix of rows: one float32 matrix product and topk, then the
candidates re-scored by the knn stage's own definition of a score, so that search answers equal the rankings."""

from __future__ import annotations

import threading

import numpy as np

from newsclip.retrieval.exact_scores import exact_scores
from newsclip.retrieval.search import PAD_KEY, merge_topk

# queries per matrix product: their (rows, n) float32 products are 4 MB each at 1M rows
QUERY_BLOCK = 8

_buffers = threading.local()


def _products_buffer(n: int) -> np.ndarray:
    """A (QUERY_BLOCK, n) float32 buffer this thread reuses: a fresh 32 MB array per batch at 1M rows cost its page
    faults every time (about as long as the product itself, measured)."""
    held = _buffers.__dict__.setdefault("by_rows", {})  # one per matrix size searched (images, texts)
    if n not in held:
        if len(held) >= 4:  # sizes of indexes swapped out since
            held.pop(next(iter(held)))
        held[n] = np.empty((QUERY_BLOCK, n), np.float32)
    return held[n]


def row_norm_bound(vectors: np.ndarray) -> float:
    """The largest row norm (it bounds a product's rounding error)."""
    if not len(vectors):
        return 0.0
    return float(np.sqrt(max(np.einsum("ij,ij->i", b, b, dtype=np.float64).max()
                             for b in np.array_split(vectors, max(1, len(vectors) // 65536)))))


def nearest(vectors: np.ndarray, max_norm: float, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores), each (b, min(k, n)), of the queries `q` (b, d) against `vectors` (n, d), best first, ties by
    row (rows are in id order, so ties go by id, as the knn stage orders them).

    The float32 products (error at most d 2^-24 |q| |x|, as FAISS's) pick every row that could reach a query's k-th
    after exact re-scoring: the best k + k/8, widened for a query whose last pick is within twice that error of
    its k-th. Those are re-scored by `exact_scores` and the best k kept."""
    import torch

    q = np.ascontiguousarray(q, dtype=np.float32)
    n, d = vectors.shape
    k = min(k, n)
    if k == 0 or not len(q):
        return np.zeros((len(q), k), np.int64), np.zeros((len(q), k), np.float32)
    kk = min(n, k + max(8, k // 8))
    qnorm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    tol = (2 * d * 2.0**-24 + 2.0**-20) * qnorm * max_norm  # search.Index's tolerance for float32 products
    rows, scores = [], []
    for s in range(0, len(q), QUERY_BLOCK):
        qb = q[s : s + QUERY_BLOCK]
        if kk == n:  # every row is a candidate
            labels = np.broadcast_to(np.arange(n, dtype=np.int64), (len(qb), n))
        else:
            out = _products_buffer(n)[: len(qb)]
            products = torch.from_numpy(np.matmul(qb, vectors.T, out=out))  # BLAS: one pass over the rows
            top, cand = torch.topk(products, kk, dim=1, sorted=True)
            low = top[:, k - 1].double().numpy() - tol[s : s + QUERY_BLOCK]
            labels = cand.numpy()
            wide = np.flatnonzero(top[:, -1].double().numpy() >= low)
            if len(wide):  # rare: rows beyond the picks may tie the k-th after re-scoring
                more = [np.flatnonzero(products[r].numpy() >= low[r]) for r in wide]
                width = max(kk, *map(len, more))
                padded = np.full((len(qb), width), -1, np.int64)
                padded[:, :kk] = labels
                for r, hits in zip(wide, more):
                    padded[r, :] = -1
                    padded[r, : len(hits)] = hits
                labels = padded
        exact = exact_scores(vectors, qb, labels)
        top_scores, keys = merge_topk([exact], [np.where(labels >= 0, labels, PAD_KEY)], k)
        rows.append(np.where(keys == PAD_KEY, -1, keys))
        scores.append(top_scores)
    return np.concatenate(rows), np.concatenate(scores)
