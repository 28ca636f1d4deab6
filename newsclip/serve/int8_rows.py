"""An int8 copy of a side's rows for serve's pass: a quarter of float32's bytes, and a kernel (numba, compiled for this
CPU) that reads it with no matrix product. The pass only picks candidates: each query's products with the int8 rows
are within a bound of the exact scores, candidates are the rows within that bound of the floor, and `nearest`
re-scores them exactly, so the answers are the float32 pass's. At 1M x 64 rows, a pass on 2 threads (best of 5, in one
run): 1 query 5.2 ms against 11.6 for the float32 product (memory-bound: it reads 256 MB), 2 queries 9 against 17, 4
18 against 22, 6 22 against 28; from 8 on the product, which reads its rows once for all queries, is as fast or
faster (`MAX_QUERIES`).

Layout: blocks of BLOCK_ROWS rows, each stored dimension by dimension ((blocks, d, BLOCK_ROWS)), so the kernel's inner
loop runs down BLOCK_ROWS rows of one dimension (vector instructions across rows) instead of summing across each
row's dimensions. Each dimension j has its own scale s_j (its largest |x|, mapped to 127)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numba import njit

BLOCK_ROWS = 256  # rows per block (64, 128, 256, 512 measured: 256 and 512 fastest)
ROWS_PER_STEP = 1 << 17  # a pass's rows per step (for one query): 8 steps at 1M rows, as the float32 pass
# rows x dimensions from which a side keeps the copy: at 30k x 64 (7 MB of float32) both passes took 0.8 ms, at
# 65k x 64 1.2 against 1.9, at 65k x 512 4.7 against 11.4, at 200k x 768 12 against 31 (one query, 2 threads)
MIN_VALUES = 1 << 21
_CHUNK_VALUES = 1 << 22  # values quantised at once: float64 temporaries of 32 MB, not the size of the matrix


@njit(nogil=True, fastmath=True)
def _hits(blocks, qs, thresholds, first, last, out):  # pragma: no cover - compiled; tested through Int8Rows
    """Rows of blocks first..last-1 whose product with a query reaches its threshold, as row * b + query, in row order
    (written to `out` while it has room); returns how many there were."""
    b, d, rows = qs.shape[0], blocks.shape[1], blocks.shape[2]
    acc = np.empty(rows, np.float32)
    n = 0
    for block in range(first, last):
        for c in range(b):
            acc[:] = 0
            for j in range(d):
                w = qs[c, j]
                for r in range(rows):
                    acc[r] += w * np.float32(blocks[block, j, r])
            for r in range(rows):
                if acc[r] >= thresholds[c]:
                    if n < out.shape[0]:
                        out[n] = (block * rows + r) * b + c
                    n += 1
    return n


@dataclass(frozen=True)
class Int8Rows:
    """A (n, d) float32 matrix as int8: x[i, j] ~ scales[j] * int8[i, j], within errors[j] (the largest, measured)."""

    blocks: np.ndarray  # (ceil(n / BLOCK_ROWS), d, BLOCK_ROWS) int8; rows past n are zeros
    scales: np.ndarray  # (d,) float32
    errors: np.ndarray  # (d,) float64: max_i |x[i, j] - scales[j] * int8[i, j]|
    n: int
    MAX_QUERIES: ClassVar[int] = 6  # queries per pass up to which this kernel is faster than the float32 product

    @classmethod
    def of(cls, vectors: np.ndarray) -> Int8Rows:
        n, d = vectors.shape
        chunk_rows = max(1, _CHUNK_VALUES // (d * BLOCK_ROWS)) * BLOCK_ROWS
        peak = np.zeros(d, np.float32)
        for start in range(0, n, chunk_rows):
            np.maximum(peak, np.abs(vectors[start : start + chunk_rows]).max(axis=0), out=peak)
        scales = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
        blocks = np.zeros((-(-n // BLOCK_ROWS), d, BLOCK_ROWS), np.int8)
        errors = np.zeros(d, np.float64)
        for start in range(0, n, chunk_rows):
            chunk = vectors[start : start + chunk_rows]
            levels = np.clip(np.rint(chunk / scales), -127, 127)
            np.maximum(errors, np.abs(chunk - levels * scales.astype(np.float64)).max(axis=0), out=errors)
            padded = np.zeros((-(-len(chunk) // BLOCK_ROWS) * BLOCK_ROWS, d), np.int8)
            padded[: len(chunk)] = levels
            first = start // BLOCK_ROWS
            blocks[first : first + len(padded) // BLOCK_ROWS] = padded.reshape(-1, BLOCK_ROWS, d).transpose(0, 2, 1)
        _hits(blocks, np.zeros((1, d), np.float32), np.zeros(1, np.float32), 0, 0, np.empty(0, np.int64))  # compiled
        return cls(blocks, scales, errors, n)  # now, not at the first query

    def bound(self, q: np.ndarray) -> np.ndarray:
        """(b,) float64: how far a query's products here can be from its exact scores: each dimension's rounding
        (|q_j| errors_j), and float32's in the kernel's sum of d products (each within 2^-24, in any order)."""
        q = np.abs(q.astype(np.float64))
        d = q.shape[1]
        return (q @ self.errors + (d + 2) * 2.0**-24 * 127 * (q @ self.scales.astype(np.float64))) * (1 + 2.0**-10)

    def hits(self, q: np.ndarray, floors: np.ndarray,
             map_steps: Callable[[Callable, Iterable], Iterable] = map) -> np.ndarray:
        """Row * b + query of every row whose exact score with a query (b, d) could reach its floor (b,), each query's
        rows ascending; `map_steps` runs the pass's steps (e.g. a thread pool's `map`)."""
        b = len(q)
        thresholds = np.nextafter((floors - self.bound(q)).astype(np.float32), np.float32(-np.inf))
        qs = np.ascontiguousarray(q * self.scales, np.float32)
        step = max(1, ROWS_PER_STEP // BLOCK_ROWS // b)

        def hits_in(first: int) -> np.ndarray:
            last = min(first + step, len(self.blocks))
            out = np.empty(4096, np.int64)
            found = _hits(self.blocks, qs, thresholds, first, last, out)
            if found > len(out):  # a loose floor: the step again, with room for all
                out = np.empty(found, np.int64)
                _hits(self.blocks, qs, thresholds, first, last, out)
            return out[:found]

        flat = np.concatenate(list(map_steps(hits_in, range(0, len(self.blocks), step))))
        return flat[flat < self.n * b]  # not the zero rows that pad the last block
