"""The torch kNN engine: a shard's rows on a CPU or a GPU, searched exactly by matrix products and topk in blocks that
fit the device, each block's candidates re-scored exactly (no faiss, no polars: it runs on any GPU torch supports)."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np

from newsclip.retrieval.exact_scores import exact_scores, keep_top

log = logging.getLogger(__name__)

# run the GPU recipe (fp16 products, float64 re-scoring on the device, its checks) on a CPU too: tests set it, so that
# the recipe is held to FAISS's rankings on machines without a GPU
GPU_RECIPE_ON_CPU = False
# a CPU block's score matrix (with its temporaries): the 128 MB of float32 products `Index.above` always used
CPU_BLOCK_BYTES = 2**27
# a GPU block takes at most this share of the device memory free when it starts
GPU_FREE_SHARE = 0.5
# bytes a block needs per score, as multiples of the product's element size: the products, the rows that need a
# threshold (a copy), the comparison mask and topk's work space
_SCORE_COPIES = 4
# a GPU query block is at least this many rows (the database side is split into blocks instead): fewer rows per
# product leave the GPU idle
_MIN_QUERY_ROWS = 256
# device re-scoring: float64 candidate rows gathered per call
_RESCORE_BYTES = 2**28


def half_unit_error(d: int) -> float:
    """Worst-case error of an fp16 product of a unit-norm query and a row of norm <= 1, as a share of 1: both inputs
    rounded to fp16 (2^-11 each: 2^-10 of sum |q_i x_i| <= 1), fp16 subnormals (2^-25 per element: sqrt(d) 2^-24
    in all), the float32 sum (d 2^-24), and the fp16 result with cuBLAS's split reductions in fp16 (what torch
    allows by default: a few 2^-11 more), rounded up to 2^-8."""
    return 2.0**-8 + (d + math.sqrt(d)) * 2.0**-24


class TorchRows:
    """A shard's float32 rows on `device` ("cpu", "cuda:0", ...), searched exactly.

    On a CPU the products are float32 (error d 2^-24 of |q| |x|, as FAISS's) and candidates are re-scored from the
    rows themselves by `exact_scores`. On a GPU the rows are held twice, scaled to norm <= 1 in fp16 for the products
    (fp16 cannot overflow then) and as given in float32; candidates are re-scored there in float64, and the rare
    score that float64 rounding could send to the other float32 is re-scored by `exact_scores` on the CPU copy, so
    every engine gives every pair the same float32 score."""

    def __init__(self, vectors: np.ndarray, device: str, max_norm: float, threads: int | None = None) -> None:
        import torch

        self.torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        self.host = vectors  # float32 rows: re-scoring on a CPU, the fallback of re-scoring on a GPU
        self.n, self.d = vectors.shape
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.half = self.on_gpu or GPU_RECIPE_ON_CPU
        self.max_norm = max_norm
        rows = _tensor(vectors)  # zero copy on a CPU
        if self.half:
            self.rows32 = rows.to(self.device)
            self.rows = (self.rows32 / (max_norm or 1.0)).half()
            self.unit_err = half_unit_error(self.d)
        else:
            self.rows32 = self.rows = rows
            self.unit_err = self.d * 2.0**-24
        self.info: dict[str, Any] = {"device": str(self.device), "products": "fp16" if self.half else "fp32"}

    # ------------------------------------------------------------------------------------------------ queries

    def _queries(self, q: np.ndarray) -> tuple[Any, np.ndarray]:
        """The queries as the products take them, and each one's factor from true scores to product scores."""
        torch = self.torch
        qt = _tensor(q).to(self.device)
        if not self.half:
            return qt, np.ones(len(q))
        qnorm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
        qnorm = np.where(qnorm > 0, qnorm, 1.0)  # a zero query scores 0 against everything, in any scale
        factor = 1.0 / (qnorm * (self.max_norm or 1.0))
        return (qt / torch.from_numpy(qnorm.astype(np.float32)).to(self.device)[:, None]).half(), factor

    def _blocks(self, b: int, kk: int) -> tuple[int, int]:
        """(query rows, database rows) per block, so that a block's scores and temporaries fit the budget."""
        per_score = _SCORE_COPIES * (2 if self.half else 4)
        if self.on_gpu:
            free, _ = self.torch.cuda.mem_get_info(self.device)
            budget = int(GPU_FREE_SHARE * free)
        else:
            budget = CPU_BLOCK_BYTES
        scores = max(budget // per_score, 1)
        if scores // self.n >= min(b, _MIN_QUERY_ROWS if self.on_gpu else 64):
            return max(1, min(b, scores // self.n)), self.n
        rows = min(b, _MIN_QUERY_ROWS if self.on_gpu else 64)
        return rows, min(self.n, max(scores // rows, kk + 1))

    @staticmethod
    def _below(low: Any) -> Any:
        """`low` lowered by more than half an fp16 unit in the last place: compared in fp16 it keeps every score the
        float32 `low` keeps."""
        return low - low.abs() * 2.0**-10 - 2.0**-24

    # ------------------------------------------------------------------------------------------------ search

    def search(self, q: np.ndarray, k: int, tol: np.ndarray, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every row scoring at least the query's k-th, re-scored exactly: (scores, rows) (b, w), in no particular
        order, padded with -inf and -1 (what `keep_top` gives; on a GPU it all happens there, block by block, and
        only the answers come back). `tol` is twice a product's error per query; `exact` is accepted for the FAISS
        engine's signature: this one always is."""
        if not self.half:
            labels = self.candidates(q, k, tol)
            return keep_top(exact_scores(self.host, q, labels), labels, k)
        torch = self.torch
        kk = min(self.n, k + max(8, k // 8))
        qt, factor = self._queries(q)
        tol_p = torch.from_numpy((tol * factor).astype(np.float32)).to(self.device)
        bq, nb = self._blocks(len(q), kk)
        parts = []
        for s in range(0, len(q), bq):
            labels = self._block_candidates(qt[s : s + bq], tol_p[s : s + bq], k, kk, nb)
            scores = self._rescore_on_device(q[s : s + bq], labels)
            kth = torch.topk(scores, k, dim=1).values[:, -1]
            v, i = self._compact((scores >= kth[:, None]) & (labels >= 0), scores, labels)
            parts.append((v.cpu().numpy(), i.cpu().numpy()))
        return _stacked([p[0] for p in parts], -np.inf), _stacked([p[1] for p in parts], -1)

    def candidates(self, q: np.ndarray, k: int, tol: np.ndarray) -> np.ndarray:
        """Row labels (b, w), padded with -1, holding every row whose exact score could reach the query's k-th: the
        kk best products per block, and for a query whose kk-th product is within `tol` (twice a product's error) of
        its k-th, every row whose product is."""
        torch = self.torch
        kk = min(self.n, k + max(8, k // 8))
        qt, factor = self._queries(q)
        tol_p = torch.from_numpy((tol * factor).astype(np.float32)).to(self.device)
        bq, nb = self._blocks(len(q), kk)
        return _stacked([self._block_candidates(qt[s : s + bq], tol_p[s : s + bq], k, kk, nb).cpu().numpy()
                         for s in range(0, len(q), bq)], -1)

    def _block_candidates(self, qt: Any, tol: Any, k: int, kk: int, nb: int) -> Any:
        torch = self.torch
        vals, labs = [], []
        for start in range(0, self.n, nb):
            scores = qt @ self.rows[start : start + nb].T
            v, i = self._select(scores, tol, k, min(kk, scores.shape[1]))
            vals.append(v)
            labs.append(torch.where(i >= 0, i + start, i))
            del scores
        v, i = torch.cat(vals, 1), torch.cat(labs, 1)
        if len(vals) > 1:  # the blocks' k-ths are each at most the query's: keep what can reach the query's own
            kth = torch.topk(v, min(k, v.shape[1]), dim=1).values[:, -1].float()
            keep = v.float() >= (kth - tol)[:, None]
            v, i = self._compact(keep, v, i)
        return i

    def _select(self, scores: Any, tol: Any, k: int, kb: int) -> tuple[Any, Any]:
        """The kb best products of each query (values, columns), widened for a query whose kb-th is within `tol` of
        its k-th to every column whose product is; padding is -inf and -1."""
        torch = self.torch
        v, i = torch.topk(scores, kb, dim=1)
        if kb == scores.shape[1]:
            return v, i
        low = v[:, min(k, kb) - 1].float() - tol
        need = torch.nonzero(v[:, -1].float() >= low)[:, 0]
        if not len(need):
            return v, i
        wide = scores[need] >= (self._below(low[need]) if self.half else low[need]).to(scores.dtype)[:, None]
        wv, wi = self._compact(wide, scores[need], None)
        width = max(kb, wv.shape[1])
        out_v = torch.full((len(v), width), -math.inf, dtype=v.dtype, device=v.device)
        out_i = torch.full((len(v), width), -1, dtype=torch.int64, device=v.device)
        out_v[:, :kb], out_i[:, :kb] = v, i
        out_v[need], out_i[need] = -math.inf, -1
        out_v[need, : wv.shape[1]], out_i[need, : wi.shape[1]] = wv, wi
        return out_v, out_i

    def _compact(self, keep: Any, values: Any, labels: Any | None) -> tuple[Any, Any]:
        """Each row's kept entries moved to its front: (values, labels) (b, w), w the most any row keeps, padded
        with -inf and -1; `labels` None means the column numbers."""
        torch = self.torch
        r, c = torch.nonzero(keep, as_tuple=True)  # row-major: each row's hits together, in column order
        counts = torch.bincount(r, minlength=keep.shape[0])
        width = max(int(counts.max()) if len(counts) else 0, 1)
        pos = torch.arange(len(r), device=keep.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                                   counts)
        out_v = torch.full((keep.shape[0], width), -math.inf, dtype=values.dtype, device=keep.device)
        out_i = torch.full((keep.shape[0], width), -1, dtype=torch.int64, device=keep.device)
        out_v[r, pos] = values[r, c]
        out_i[r, pos] = c if labels is None else labels[r, c]
        return out_v, out_i

    def above_rows(self, q: np.ndarray, low: np.ndarray) -> np.ndarray:
        """Row labels (b, w), padded with -1, of every row whose product is at least the query's `low` (a true score
        less twice a product's error: then every row whose exact score is at least `low` + that is there)."""
        torch = self.torch
        qt, factor = self._queries(q)
        low_p = torch.from_numpy((low * factor).astype(np.float32)).to(self.device)
        low_p = self._below(low_p) if self.half else low_p
        bq, nb = self._blocks(len(q), 1)
        parts = []
        for s in range(0, len(q), bq):
            labs = []
            for start in range(0, self.n, nb):
                scores = qt[s : s + bq] @ self.rows[start : start + nb].T
                _, i = self._compact(scores >= low_p[s : s + bq, None].to(scores.dtype), scores, None)
                labs.append(torch.where(i >= 0, i + start, i))
            parts.append(torch.cat(labs, 1).cpu().numpy())  # padding between blocks' hits is ignored as any
        return _stacked(parts, -1)

    def set_knob(self, value: int) -> int:
        raise ValueError("knn.engine torch searches exactly: it has no nprobe or efSearch to set")

    # ------------------------------------------------------------------------------------------------ re-scoring

    def rescore(self, q: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Exact scores (b, w) float32 of the labelled rows, -inf for padding: `exact_scores`'s, bit for bit."""
        if not self.half:
            return exact_scores(self.host, q, labels)
        lab = _tensor(np.ascontiguousarray(labels)).to(self.device)
        return self._rescore_on_device(q, lab).cpu().numpy()

    def _rescore_on_device(self, q: np.ndarray, labels: Any) -> Any:
        """`rescore` for labels on the device, answering there: float64 products of the float32 rows, rounded to
        float32, and the few whose float64 sum may round otherwise in another order re-scored on the CPU."""
        torch = self.torch
        b, w = labels.shape
        out = torch.empty((b, w), dtype=torch.float32, device=self.device)
        q64 = _tensor(q).to(self.device).double()
        step = max(1, _RESCORE_BYTES // max(w * self.d * 8, 1))
        # float64 sums of d products of float32s (each exact in float64) are within (d + 2) 2^-53 |q| |x| of the
        # true sum in any order: where a float32 rounding boundary is nearer than twice that, the order matters
        err = (self.d + 2) * 2.0**-53 * torch.linalg.vector_norm(q64, dim=1) * self.max_norm
        near_rows, near_cols = [], []
        for s in range(0, b, step):
            part = labels[s : s + step]
            valid = part >= 0
            s64 = torch.bmm(self.rows32[part.clamp(min=0)].double(), q64[s : s + step, :, None])[..., 0]
            s32 = s64.float()
            up = (s32.double() + torch.nextafter(s32, torch.full_like(s32, math.inf)).double()) / 2
            down = (s32.double() + torch.nextafter(s32, torch.full_like(s32, -math.inf)).double()) / 2
            margin = 2 * err[s : s + step, None]
            r, c = torch.nonzero(valid & ((s64 + margin >= up) | (s64 - margin <= down)), as_tuple=True)
            near_rows.append(r + s)
            near_cols.append(c)
            out[s : s + step] = torch.where(valid, s32, -math.inf)
        r, c = torch.cat(near_rows), torch.cat(near_cols)
        if len(r):
            host = exact_scores(self.host, q[r.cpu().numpy()], labels[r, c].cpu().numpy()[:, None])[:, 0]
            out[r, c] = torch.from_numpy(host).to(self.device)
        return out


def _stacked(parts: list[np.ndarray], pad: float) -> np.ndarray:
    """Blocks of rows (each (rows, w_i)) one under another, each padded on the right to the widest with `pad`."""
    out = np.full((sum(len(p) for p in parts), max(p.shape[1] for p in parts)), pad, parts[0].dtype)
    s = 0
    for p in parts:
        out[s : s + len(p), : p.shape[1]] = p
        s += len(p)
    return out


def _tensor(array: np.ndarray) -> Any:
    """`array` as a CPU tensor without a copy. Arrays from Ray's object store (and broadcast views) are read-only,
    which torch warns about: nothing here writes to them."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
