"""Exact top-k of a batch of queries against one matrix of rows: float32 products pick a few hundred candidates in
one pass over the rows, then the knn stage's own definition of a score re-scores them, so that search answers equal
the rankings."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from newsclip.retrieval.exact_scores import exact_scores, padded_labels
from newsclip.retrieval.search import PAD_KEY, merge_topk

# products per step of the pass (512 KB): a step's are compared with the floor while still in cache, instead of
# writing 4 MB of products per query at 1M rows and ranking them (torch.topk: ~3 ms a query). 8 steps at 1M rows for
# one query: enough to share a pass out among threads (2^15 was slower, 2^16 no better), few enough that taking the
# GIL back after each step costs little
BLOCK_PRODUCTS = 1 << 17
# the floor comes from every SAMPLE_STRIDE-th row (a view: 1/32 of the pass at 1M rows); its k-th best product is
# about the (k * stride)-th of all rows, so ~k * stride candidates pass, fewer for a large k (see _stride)
SAMPLE_STRIDE = 32
CANDIDATES = 4096


def row_norm_bound(vectors: np.ndarray) -> float:
    """The largest row norm (it bounds a product's rounding error)."""
    if not len(vectors):
        return 0.0
    return float(np.sqrt(max(np.einsum("ij,ij->i", b, b, dtype=np.float64).max()
                             for b in np.array_split(vectors, max(1, len(vectors) // 65536)))))


def nearest(vectors: np.ndarray, max_norm: float, q: np.ndarray, k: int,
            map_steps: Callable[[Callable, Iterable], Iterable] = map, int8=None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores), each (b, min(k, n)), of the queries `q` (b, d) against `vectors` (n, d), best first, ties by
    row (rows are in id order, so ties go by id, as the knn stage orders them).

    A float32 product is within e = d 2^-24 |q| |x| of the exact score (as FAISS's), so the exact k-th best score
    is at least the k-th best product of any subset of rows less e, and a row that can reach it has a product at
    least that less 2e (`tol`). The subset is a strided sample; the rows passing its floor are re-scored by
    `exact_scores` and the best k kept. `map_steps` runs the pass's steps (in order of results), e.g. a thread pool's
    `map`. With `int8` (the rows' Int8Rows) a pass of up to its MAX_QUERIES queries reads those instead."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    n, d = vectors.shape
    k = min(k, n)
    if k == 0 or not len(q):
        return np.zeros((len(q), k), np.int64), np.zeros((len(q), k), np.float32)
    qnorm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    tol = (2 * d * 2.0**-24 + 2.0**-20) * qnorm * max_norm  # search.Index's tolerance for float32 products
    sample = vectors[:: _stride(n, k)] @ q.T  # (m, b); a strided view goes to BLAS as it is
    floor = np.partition(sample, len(sample) - k, axis=0)[len(sample) - k] - tol
    floor = np.nextafter(floor.astype(np.float32), np.float32(-np.inf))  # compared in float32: never rounded up
    if int8 is not None and len(q) <= int8.MAX_QUERIES:
        return _rescored(vectors, q, k, int8.hits(q, floor, map_steps))
    # compared flat, against the floor repeated per row: numpy's loop over a (rows, b) >= (b,) broadcast runs b
    # elements at a time (it took longer than the products for b = 2)
    step = max(1, BLOCK_PRODUCTS // len(q))
    floors = np.tile(floor, min(n, step))

    def hits_in(start: int) -> np.ndarray:
        products = vectors[start : start + step] @ q.T  # (rows, b)
        return np.flatnonzero(products.reshape(-1) >= floors[: products.size]) + start * len(q)

    return _rescored(vectors, q, k, np.concatenate(list(map_steps(hits_in, range(0, n, step)))))


def _rescored(vectors: np.ndarray, q: np.ndarray, k: int, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best k of the candidates `hits` (row * b + query, each query's rows ascending), by their exact scores."""
    rows, queries = np.divmod(hits, len(q))
    order = np.argsort(queries, kind="stable")  # grouped by query, rows ascending within each
    labels = padded_labels(queries[order], rows[order], len(q))
    return best_k(exact_scores(vectors, q, labels), labels, k)


def best_k(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) (b, k) of candidates (b, w) with their exact scores, padded with -1: best first, ties by row."""
    scores, keys = merge_topk([scores], [np.where(labels >= 0, labels, PAD_KEY)], k)
    return np.where(keys == PAD_KEY, -1, keys), scores


def _stride(n: int, k: int) -> int:
    """The sample's stride: ~CANDIDATES // k rows per sampled row (at most SAMPLE_STRIDE), and k rows sampled."""
    return max(1, min(SAMPLE_STRIDE, CANDIDATES // k, n // k))
