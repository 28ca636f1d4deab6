"""The knn stage's search: exact (or IVF/HNSW) top-k over database shards, each held by an engine (FAISS, or torch's
matrix products on any GPU), in-process or one Ray actor per shard, merged deterministically."""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from newsclip.retrieval.exact_scores import exact_scores, keep_top, padded_labels

log = logging.getLogger(__name__)

_INDEXES = ("flat", "ivf", "hnsw")
_BACKENDS = ("local", "ray")
_ENGINES = ("auto", "faiss", "torch")
# `engine: auto` on a CPU: FAISS's flat search beat torch's matmul + topk on this project's 2-core machine (see
# benchmarks/knn_scale.py --engines and the README), so FAISS stays the CPU default
CPU_ENGINE = "faiss"
# faiss GPU k-selection handles k <= 2048 (GPU_MAX_SELECTION_K); beyond that a GPU shard searches on the CPU.
_GPU_MAX_K = 2048
# FAISS warns below 39 training points per k-means centroid, so an IVF shard gets at most n // 39 lists.
_MIN_POINTS_PER_CENTROID = 39
# and trains on at most 256 points per centroid (FAISS's own max_points_per_centroid default).
_MAX_POINTS_PER_CENTROID = 256
# scores computed per matrix product in `_Shard.above` (128 MB of float32)
_ABOVE_BLOCK = 2**25
PAD_KEY = np.iinfo(np.int64).max
# `Index.tune` tries HNSW's efSearch up to this: beyond it a search of the sample costs more than an exact one
TUNE_MAX_EF = 2**14
# `Index.tune` bisects until the value chosen is within this share of the largest that misses the target
TUNE_RESOLUTION = 1 / 16
_KEY_LIMIT = 2**32 - 1  # merge_topk packs a key into 32 bits (this value is padding): databases of < 4.29e9 rows


@dataclass(frozen=True)
class KnnConfig:
    """How the knn stage searches: k, sharding, index kind and its knobs, and where shards run."""

    k: int = 100
    shards: int = 1  # number of database shards (array input); fewer if the database has fewer rows
    max_shard_rows: int | None = None  # bound on a shard's size; more shards are made if needed
    query_batch_size: int = 4096  # the query stream is re-batched to this many rows
    index: str = "flat"  # "flat" (exact) | "ivf" (IVF-Flat) | "hnsw"
    nlist: int = 1024  # ivf: clamped per shard to max(1, min(nlist, rows // 39))
    nprobe: int = 32  # ivf: clamped to the shard's nlist
    hnsw_m: int = 32
    ef_search: int = 128  # hnsw: raised to the number of candidates asked for when that is larger
    ef_construction: int = 200
    backend: str = "local"  # "local": shards in this process; "ray": one Ray actor per shard
    # "faiss", "torch" (exact only: matmul + topk in blocks, fp16 products on GPUs) or "auto" (see `engine_for`)
    engine: str = "auto"
    num_cpus_per_actor: float = 1.0  # on a 2-CPU machine with several shards this must be small (e.g. 0.25)
    num_gpus_per_actor: float = 0.0  # >0 -> the shard searches on a GPU when it sees one (faiss-gpu or torch)
    gpu_float16: bool = False
    recall_sample: int = 1000  # approximate indexes: queries sampled to measure recall@k against exact search
    # approximate indexes: the smallest nprobe (ivf) or efSearch (hnsw) whose recall@k on a seeded sample of
    # `recall_sample` queries reaches this, chosen before the full search (None: the configured value)
    target_recall: float | None = None
    max_inflight_batches: int = 2  # ray: query batches submitted to the actors and not yet merged (backpressure)
    seed: int = 0  # recall sample and IVF training sample

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> None:
            raise ValueError(f"KnnConfig.{key}: {why} (got {getattr(self, key)!r})")

        for key in ("k", "shards", "query_batch_size", "nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction",
                    "max_inflight_batches"):
            value = getattr(self, key)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                bad(key, "must be an integer >= 1")
        if self.max_shard_rows is not None and (not isinstance(self.max_shard_rows, int | np.integer)
                                                or self.max_shard_rows < 1):
            bad("max_shard_rows", "must be None or an integer >= 1")
        if self.index not in _INDEXES:
            bad("index", f"must be one of {_INDEXES}")
        if self.backend not in _BACKENDS:
            bad("backend", f"must be one of {_BACKENDS}")
        if self.engine not in _ENGINES:
            bad("engine", f"must be one of {_ENGINES}")
        if self.engine == "torch" and self.index != "flat":
            bad("engine", f"torch searches exactly: it needs index 'flat', not {self.index!r} (or engine 'faiss')")
        if self.target_recall is not None and (isinstance(self.target_recall, bool)
                                               or not isinstance(self.target_recall, int | float)
                                               or not 0 < self.target_recall <= 1):
            bad("target_recall", "must be None or a number in (0, 1]")
        if self.target_recall is not None and self.recall_sample < 1:
            bad("target_recall", "needs recall_sample >= 1: the queries the knob is chosen on")
        if not self.num_cpus_per_actor >= 0:
            bad("num_cpus_per_actor", "must be >= 0")
        if not self.num_gpus_per_actor >= 0:
            bad("num_gpus_per_actor", "must be >= 0")
        if not isinstance(self.recall_sample, int | np.integer) or self.recall_sample < 0:
            bad("recall_sample", "must be an integer >= 0")


@dataclass
class KnnResult:
    """Top-k database ids and scores per query, in query-stream order.

    `ids[i, j]` is the j-th nearest database id of `query_ids[i]` (sorted by score desc, then id asc); positions an
    approximate index could not fill hold None with score -inf. `recall_at_k` is None for the exact "flat" index.
    """

    query_ids: np.ndarray  # (n,)
    ids: np.ndarray  # (n, k') object, k' = min(k, len(db))
    scores: np.ndarray  # (n, k') float32
    recall_at_k: float | None = None
    shard_stats: list[dict[str, Any]] = field(default_factory=list)  # per shard: rows, build_s, peak RSS, ...
    timings: dict[str, float] = field(default_factory=dict)


def merge_topk(scores: list[np.ndarray], keys: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard candidates into the top-k per row, ordered by score desc then key asc.

    `scores[s]` (b, w_s) and `keys[s]` (b, w_s) int64 come from shard s; a key is the tie-break rank of a database id
    (its position in sorted id order), padding is score -inf. Returns (b, k) scores and keys, padded with -inf and
    the int64 max key when fewer than k candidates exist.
    """
    s = np.concatenate([np.asarray(x, dtype=np.float32) for x in scores], axis=1)
    kk = np.concatenate([np.asarray(x, dtype=np.int64) for x in keys], axis=1)
    if s.shape != kk.shape:
        raise ValueError(f"merge_topk: scores {s.shape} and keys {kk.shape} differ in shape")
    if s.shape[1] < k:
        fill = k - s.shape[1]
        s = np.concatenate([s, np.full((s.shape[0], fill), -np.inf, np.float32)], axis=1)
        kk = np.concatenate([kk, np.full((kk.shape[0], fill), PAD_KEY, np.int64)], axis=1)
    if kk.size and kk[kk != PAD_KEY].max(initial=0) >= _KEY_LIMIT:
        raise ValueError(f"merge_topk: keys must be below {_KEY_LIMIT} (a database of fewer rows)")
    # one uint64 per candidate whose ascending order is score desc, then key asc: the score's float32 bits made
    # order-preserving and inverted (padding, -inf, sorts last), above the key; a partition then a sort of k
    bits = (s + np.float32(0)).view(np.uint32)  # + 0: -0.0 becomes 0.0, as equal as they compare
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))
    combined = (~ascending).astype(np.uint64) << np.uint64(32) | np.minimum(kk, _KEY_LIMIT).astype(np.uint64)
    if combined.shape[1] > k:
        combined = np.partition(combined, k - 1, axis=1)[:, :k]
    combined.sort(axis=1)
    ascending = ~(combined >> np.uint64(32)).astype(np.uint32)
    top = np.where(ascending >> 31, ascending & np.uint32(0x7FFFFFFF), ~ascending).view(np.float32)
    key = (combined & np.uint64(_KEY_LIMIT)).astype(np.int64)
    return top, np.where(key == _KEY_LIMIT, PAD_KEY, key)


def engine_for(cfg: KnnConfig, use_gpu: bool) -> str:
    """The engine a shard runs, decided in the process that holds it (a Ray actor sees only its own GPU): `engine`
    unless it is "auto", which takes faiss-gpu when faiss imports and sees a GPU, else torch on a GPU, else
    CPU_ENGINE (the other where that one does not import). Approximate indexes are FAISS's."""
    if cfg.engine != "auto":
        return cfg.engine
    if cfg.index != "flat":
        return "faiss"
    if use_gpu:
        faiss = _module("faiss")
        if faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            return "faiss"
        torch = _module("torch")  # only where a GPU is asked for: a FAISS shard on a CPU never imports torch
        if torch is not None and torch.cuda.is_available():
            return "torch"
    other = "torch" if CPU_ENGINE == "faiss" else "faiss"
    return CPU_ENGINE if _module(CPU_ENGINE) is not None else other


def _module(name: str) -> Any:
    """The module `name`, or None where it does not import (the GPU machines have no faiss)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def gpu_count() -> int:
    """GPUs this process sees, by faiss when it has GPU support, else by torch; 0 when neither imports."""
    faiss = _module("faiss")
    if faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return faiss.get_num_gpus()
    torch = _module("torch")
    return torch.cuda.device_count() if torch is not None and torch.cuda.is_available() else 0


class _FaissRows:
    """A shard's rows in a FAISS index (flat, IVF or HNSW; on a GPU with faiss-gpu), searched for candidates that
    `_Shard` re-scores exactly."""

    def __init__(self, vectors: np.ndarray, offset: int, cfg: KnnConfig, use_gpu: bool, gpu_device: int,
                 omp_threads: int | None) -> None:
        import faiss

        if omp_threads is not None:
            faiss.omp_set_num_threads(omp_threads)
        self.n, self.d = vectors.shape
        self.offset = offset
        self.cfg = cfg
        self.kind = cfg.index
        self._gpu_res = None
        self.on_gpu = False
        metric = faiss.METRIC_INNER_PRODUCT
        self.info: dict[str, Any] = {}
        if self.kind == "flat":
            index = faiss.IndexFlatIP(self.d)
            index.add(vectors)
            # re-score from the index's own storage: no second copy of the shard (the object-store copy is released)
            self.host = faiss.rev_swig_ptr(index.get_xb(), self.n * self.d).reshape(self.n, self.d)
        elif self.kind == "ivf":
            self.nlist = max(1, min(cfg.nlist, self.n // _MIN_POINTS_PER_CENTROID))
            self.nprobe = min(cfg.nprobe, self.nlist)
            quantizer = faiss.IndexFlatIP(self.d)
            index = faiss.IndexIVFFlat(quantizer, self.d, self.nlist, metric)  # faiss's wrapper keeps quantizer alive
            n_train = min(self.n, _MAX_POINTS_PER_CENTROID * self.nlist)
            rng = np.random.default_rng(cfg.seed + self.offset)
            train = vectors if n_train == self.n else vectors[np.sort(rng.choice(self.n, n_train, replace=False))]
            index.cp.seed = cfg.seed  # deterministic k-means
            index.train(train)
            index.add(vectors)
            index.nprobe = self.nprobe
            self.host = vectors  # IVF lists are not in row order: keep the rows for re-scoring and recall
            self.info.update(nlist=self.nlist, nprobe=self.nprobe)
        else:  # hnsw
            index = faiss.IndexHNSWFlat(self.d, cfg.hnsw_m, metric)
            index.hnsw.efConstruction = cfg.ef_construction
            index.add(vectors)
            storage = faiss.downcast_index(index.storage)
            self.host = faiss.rev_swig_ptr(storage.get_xb(), self.n * self.d).reshape(self.n, self.d)
            self.ef_search = cfg.ef_search
            self.info.update(hnsw_m=cfg.hnsw_m, ef_search=cfg.ef_search, ef_construction=cfg.ef_construction)
        if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            if self.kind == "hnsw":
                log.warning("knn: faiss has no GPU HNSW; shard at offset %d stays on the CPU", self.offset)
            else:
                self._gpu_res = faiss.StandardGpuResources()
                co = faiss.GpuClonerOptions()
                co.useFloat16 = cfg.gpu_float16
                index = faiss.index_cpu_to_gpu(self._gpu_res, gpu_device, index, co)
                if self.kind == "ivf":
                    faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", self.nprobe)
                if self.kind == "flat":
                    self.host = vectors  # the CPU index is gone; keep the rows (zero-copy from the object store)
                self.on_gpu = True
        self.index = index
        # FAISS's float32 error: |score - exact| <= d * 2^-24 * |q| * |x| (worst-case dot-product bound)
        self.unit_err = self.d * 2.0 ** -24
        if self.on_gpu and cfg.gpu_float16:
            self.unit_err += 2.0 ** -9  # both sides rounded to float16 (2^-11 each), with room for fp16 accumulation

    def set_knob(self, value: int) -> int:
        """Set nprobe (ivf, at most the shard's nlist) or efSearch (hnsw); the value set."""
        if self.kind == "ivf":
            self.nprobe = min(int(value), self.nlist)
            if self.on_gpu:
                import faiss

                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.nprobe)
            else:
                self.index.nprobe = self.nprobe
            self.info["nprobe"] = self.nprobe
            return self.nprobe
        if self.kind == "hnsw":
            self.ef_search = self.info["ef_search"] = int(value)
            return self.ef_search
        raise ValueError("knn.index flat searches exactly: it has no nprobe or efSearch to set")

    def _raw(self, q: np.ndarray, kk: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if (exact and self.kind != "flat") or (self.on_gpu and kk > _GPU_MAX_K):
            return faiss.knn(q, self.host, kk, metric=faiss.METRIC_INNER_PRODUCT)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, kk)
        return self.index.search(q, kk)

    def candidates(self, q: np.ndarray, k_eff: int, tol: np.ndarray, exact: bool) -> np.ndarray:
        """FAISS's kk best rows per query, more for a query whose last one is within `tol` of its k-th: a query whose
        last candidate scores within FAISS's float32 error of its k-th is searched again with twice as many."""
        kk = min(self.n, k_eff + max(8, k_eff // 8))
        pending = np.arange(q.shape[0])
        groups: list[tuple[np.ndarray, np.ndarray]] = []
        dist, lab = self._raw(q, kk, exact)
        while True:
            need = (kk < self.n) & (lab[:, -1] >= 0) & (dist[:, -1] >= dist[:, k_eff - 1] - tol[pending])
            groups.append((pending[~need], lab[~need]))
            if not need.any():
                break
            pending = pending[need]
            kk = min(self.n, 2 * kk)
            dist, lab = self._raw(q[pending], kk, exact)
        labels = np.full((q.shape[0], max(g[1].shape[1] for g in groups)), -1, np.int64)
        for rows, lab in groups:
            labels[rows, : lab.shape[1]] = lab
        return labels

    def search(self, q: np.ndarray, k: int, tol: np.ndarray, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        """Every row scoring at least the query's k-th, re-scored exactly: (scores, rows) (b, w), padded -inf, -1."""
        labels = self.candidates(q, k, tol, exact)
        return keep_top(self.rescore(q, labels), labels, k)

    def above_rows(self, q: np.ndarray, low: np.ndarray) -> np.ndarray:
        """Labels (b, w), padded with -1, of every row whose float32 product is at least its query's `low`."""
        rows, cols = [], []
        step = max(1, _ABOVE_BLOCK // max(len(q), 1))
        for start in range(0, self.n, step):
            r, c = np.nonzero(q @ self.host[start : start + step].T >= low[:, None])
            rows.append(r)
            cols.append(c + start)
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        if step < self.n:  # each block's hits are grouped by query (row-major), the blocks' together are not
            order = np.argsort(rows, kind="stable")
            rows, cols = rows[order], cols[order]
        return padded_labels(rows, cols, len(q))

    def rescore(self, q: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return exact_scores(self.host, q, labels)


class _Shard:
    """One database shard: its rows in an engine (`_FaissRows`, or torch's `TorchRows`), answering with candidates
    re-scored exactly, so that every engine gives the same answers.

    Used in-process by the local backend and wrapped by `ray.remote` (one actor per shard) by the ray backend.
    """

    def __init__(self, vectors: np.ndarray, offset: int, cfg: KnnConfig, use_gpu: bool = False, gpu_device: int = 0,
                 omp_threads: int | None = None) -> None:
        t0 = time.perf_counter()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.n, self.d = vectors.shape
        self.offset = int(offset)
        self.cfg = cfg
        # norms bound the products' error (see `_tolerance`)
        self._max_norm = max((float(np.sqrt(np.einsum("ij,ij->i", c, c, dtype=np.float64).max()))
                              for c in _row_blocks(vectors, 65536)), default=0.0)
        self.engine = engine_for(cfg, use_gpu)
        if self.engine == "torch":
            from newsclip.retrieval.torch_search import TorchRows

            device = "cpu"
            if use_gpu:
                import torch

                if torch.cuda.is_available():
                    device = f"cuda:{gpu_device}"
                else:
                    log.warning("knn: torch sees no GPU; shard at offset %d searches on the CPU", self.offset)
            self.rows: _FaissRows | Any = TorchRows(vectors, device, self._max_norm, omp_threads)
        else:
            self.rows = _FaissRows(vectors, self.offset, cfg, use_gpu, gpu_device, omp_threads)
        self._info = dict(rows=self.n, offset=self.offset, index=cfg.index, engine=self.engine, gpu=self.rows.on_gpu,
                          build_s=round(time.perf_counter() - t0, 3), **self.rows.info)

    def stats(self) -> dict[str, Any]:
        """Rows, engine, build time and memory of the process holding this shard (see `process_memory`)."""
        import os

        out = dict(self._info)
        out.update(self.rows.info)
        out["pid"] = os.getpid()
        out["nice"] = os.nice(0)  # Ray starts its workers at niceness 15
        out.update(process_memory())
        return out

    def set_knob(self, value: int) -> int:
        """Set the approximate index's nprobe (ivf) or efSearch (hnsw); the value this shard took."""
        return self.rows.set_knob(value)

    def search(self, q: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Candidates holding this shard's top-k, in no particular order: (scores f32, global rows).

        The engine takes every row whose low-precision product is within twice its error of the k-th (so every
        row that could tie the k-th after exact re-scoring is present), re-scores them exactly (`exact_scores`: the
        same pair gets the same score in every shard layout, batch size and engine), and returns all those scoring
        >= the shard's k-th (b, w), w >= min(k, rows) (`keep_top`); padding is score -inf, row -1.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        b = q.shape[0]
        k_eff = min(k, self.n)
        kk = min(self.n, k_eff + max(8, k_eff // 8))
        if kk == self.n:  # every row is a candidate (a small shard, a night's added rows): nothing to select
            labels = np.broadcast_to(np.arange(self.n, dtype=np.int64), (b, self.n))
            scores, labels = keep_top(self.rows.rescore(q, labels), labels, k_eff)
        else:
            scores, labels = self.rows.search(q, k_eff, self._tolerance(q), exact)
        return scores, np.where(labels >= 0, labels + self.offset, -1)

    def above(self, q: np.ndarray, floor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every row whose exact score is at least its query's `floor`: (scores f32, global rows), (b, w) in no
        particular order, padded with -inf and -1. What a night's added rows need against last top-k's (`floor`: a
        query's k-th score): the engine's products find the few rows within their error of the floor, and only
        those are re-scored, exactly as `search` scores them."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        floor = np.asarray(floor, np.float64)
        labels = self.rows.above_rows(q, floor - self._tolerance(q))
        scores = self.rows.rescore(q, labels)
        keep = (labels >= 0) & (scores >= floor[:, None])
        return np.where(keep, scores, -np.inf).astype(np.float32), np.where(keep, labels + self.offset, -1)

    def _tolerance(self, q: np.ndarray) -> np.ndarray:
        """Per query: twice the error bound of a product (both a candidate's and the k-th may be off) plus room for
        float32 rounding."""
        qnorm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
        return (2 * self.rows.unit_err + 2.0 ** -20) * qnorm * self._max_norm


def gpu_shard(vectors: np.ndarray) -> _Shard | None:
    """`vectors` as one exact shard on this process's GPU, run by the torch engine as the knn stage runs it there, or
    None where torch sees no GPU: `search(q, k)` gives each query every row scoring at least its k-th, re-scored
    exactly (the same scores as every engine and the CPU's `exact_scores`)."""
    torch = _module("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return _Shard(vectors, 0, KnnConfig(engine="torch"), use_gpu=True)


def process_memory() -> dict[str, float]:
    """This process's memory in MiB: peak and current RSS, and current RSS split into anonymous (private heap, e.g.
    a FAISS index) and shared-memory pages (Ray object-store objects this process wrote or read zero-copy)."""
    import resource

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    names = {"VmHWM": "peak_rss_mib", "VmRSS": "rss_mib", "RssAnon": "anon_mib", "RssShmem": "shmem_mib"}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in names:
                    out[names[key]] = round(int(value.split()[0]) / 1024, 1)
    except OSError:  # not Linux: getrusage's peak only
        pass
    return out


def _row_blocks(x: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    for s in range(0, x.shape[0], rows):
        yield x[s : s + rows]


# ----------------------------------------------------------------------------------------------------------------
# backends: add shards, then submit query batches and fetch per-shard candidates in order


class _LocalBackend:
    def __init__(self, cfg: KnnConfig) -> None:
        self.cfg = cfg
        self.shards: list[_Shard] = []
        self._ngpu = gpu_count() if cfg.num_gpus_per_actor > 0 else 0

    def add_shard(self, offset: int, vectors: np.ndarray) -> None:
        i = len(self.shards)
        self.shards.append(_Shard(vectors, offset, self.cfg, use_gpu=self._ngpu > 0,
                                  gpu_device=i % max(self._ngpu, 1)))

    def ready(self) -> list[dict[str, Any]]:
        return [s.stats() for s in self.shards]

    def submit(self, q: np.ndarray, *args: Any, method: str = "search") -> Any:
        return [getattr(s, method)(q, *args) for s in self.shards]

    def fetch(self, handle: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        return handle

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.shards]

    def stats(self) -> list[dict[str, Any]]:
        return [s.stats() for s in self.shards]

    def close(self) -> None:
        self.shards.clear()


class _RayBackend:
    def __init__(self, cfg: KnnConfig) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("KnnConfig.backend='ray' needs a running Ray: call ray.init() (or connect) first")
        self.ray = ray
        self.cfg = cfg
        # one actor per shard; OMP threads follow the CPUs reserved for it (at least one)
        self._cls = ray.remote(_Shard).options(num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor)
        self._omp = max(1, int(round(cfg.num_cpus_per_actor)))
        self.actors: list[Any] = []
        self._refs: list[Any] = []

    def add_shard(self, offset: int, vectors: np.ndarray) -> None:
        # the shard goes to the object store once; the actor gets it zero-copy and builds while the driver streams on
        ref = self.ray.put(np.ascontiguousarray(vectors, dtype=np.float32))
        self._refs.append(ref)
        self.actors.append(self._cls.remote(ref, offset, self.cfg, use_gpu=self.cfg.num_gpus_per_actor > 0,
                                            gpu_device=0, omp_threads=self._omp))

    def ready(self) -> list[dict[str, Any]]:
        stats = self.ray.get([a.stats.remote() for a in self.actors])
        self._refs.clear()  # built: let the object store free the shard copies the actors no longer hold
        return stats

    def submit(self, q: np.ndarray, *args: Any, method: str = "search") -> Any:
        ref = self.ray.put(q)  # one copy of the batch for all actors
        return [getattr(a, method).remote(ref, *args) for a in self.actors]

    def fetch(self, handle: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.ray.get(handle)

    def call(self, method: str, *args: Any) -> list[Any]:
        return self.ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def stats(self) -> list[dict[str, Any]]:
        return self.ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors.clear()
        self._refs.clear()


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _as_vectors(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [rows, dim], got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _as_ids(x: Any, n: int, what: str) -> np.ndarray:
    ids = np.asarray(x)
    if ids.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {ids.shape}")
    if len(ids) != n:
        raise ValueError(f"{what} has {len(ids)} ids for {n} vectors")
    return ids


def _pairs(items: Iterable[Any], what: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(position, ids, vectors) of each (ids, vectors) item, checked, with errors that name the item."""
    for i, item in enumerate(items):
        try:
            ids, vectors = item
        except (TypeError, ValueError):
            raise ValueError(f"{what} {i} is not an (ids, vectors) pair") from None
        vec = _as_vectors(vectors, f"{what} {i} vectors")
        yield i, _as_ids(ids, len(vec), f"{what} {i} ids"), vec


def _db_chunks(db_ids: Any, db_vectors: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if db_ids is None:
        if isinstance(db_vectors, np.ndarray):
            raise ValueError("db_ids is None: db_vectors must then be an iterable of (ids, vectors) chunks")
        yield from ((ids, vec) for _, ids, vec in _pairs(db_vectors, "db chunk"))
    else:
        vec = _as_vectors(db_vectors, "db_vectors")
        yield _as_ids(db_ids, len(vec), "db_ids"), vec


def _query_batches(queries: Iterable[tuple[Any, Any]], d: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i, ids, vec in _pairs(queries, "query batch"):
        if vec.shape[1] != d:
            raise ValueError(f"query batch {i} has dim {vec.shape[1]}, the database has dim {d}")
        if len(vec):
            yield ids, vec


def _rebatch(batches: Iterator[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    ids_buf: list[np.ndarray] = []
    vec_buf: list[np.ndarray] = []
    held = 0
    for ids, vec in batches:
        ids_buf.append(ids)
        vec_buf.append(vec)
        held += len(vec)
        if held < size:
            continue
        all_ids = np.concatenate(ids_buf) if len(ids_buf) > 1 else ids_buf[0]
        all_vec = np.concatenate(vec_buf) if len(vec_buf) > 1 else vec_buf[0]
        full = (held // size) * size
        for s in range(0, full, size):
            yield all_ids[s : s + size], all_vec[s : s + size]
        ids_buf, vec_buf = ([all_ids[full:]], [all_vec[full:]]) if full < held else ([], [])
        held -= full
    if held:
        yield np.concatenate(ids_buf), np.concatenate(vec_buf)


def _shard_plan(n: int, cfg: KnnConfig) -> list[int]:
    """Shard sizes for an n-row database given as one array: `shards`, more if `max_shard_rows` needs, at most n."""
    count = cfg.shards
    if cfg.max_shard_rows is not None:
        count = max(count, math.ceil(n / cfg.max_shard_rows))
    count = min(count, n)
    base, extra = divmod(n, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def _recall(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of each row's exact top-k keys that `approx` found (padding found nothing)."""
    hits = [len(np.intersect1d(a[a != PAD_KEY], e[e != PAD_KEY], assume_unique=True)) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k) if hits else 1.0


class _Reservoir:
    """A seeded uniform sample of query rows over a stream of unknown length (algorithm R), each with its answer."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.vec: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.seen = 0

    def add(self, vec: np.ndarray, keys: np.ndarray) -> None:
        if self.size == 0:
            return
        start = self.seen
        self.seen += len(vec)
        take = min(len(vec), max(self.size - start, 0))
        self.vec += [v.copy() for v in vec[:take]]
        self.keys += [k.copy() for k in keys[:take]]
        if take == len(vec):
            return
        idx = np.arange(start + take, self.seen)
        slots = self.rng.integers(0, idx + 1)
        for i in np.flatnonzero(slots < self.size):
            self.vec[slots[i]] = vec[idx[i] - start].copy()
            self.keys[slots[i]] = keys[idx[i] - start].copy()


# ----------------------------------------------------------------------------------------------------------------


def _id_order(ids: np.ndarray) -> np.ndarray:
    """The order that sorts `ids`; ValueError when one is there twice. Strings sort by their UTF-8 bytes, as Arrow
    sorts them (the rankings' query order): numpy's unicode arrays would take 4 bytes a character (400 MB for 1M
    URL ids) and drop a trailing NUL, calling "a" and "a\\x00" the same id."""
    if ids.dtype == object:
        import pyarrow as pa
        import pyarrow.compute as pc

        try:
            strings = pa.array(ids, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # objects that are not strings compare as their text
            strings = pa.array(ids.astype(str), pa.string())
        order = pc.sort_indices(strings).to_numpy().astype(np.int64)
        ranked = strings.take(order)
        same = pc.equal(ranked.slice(1), ranked.slice(0, len(ranked) - 1)).to_numpy(zero_copy_only=False)
        ranked = ranked.to_numpy(zero_copy_only=False) if same.any() else None
    else:
        order = np.argsort(ids, kind="stable")
        ranked = ids[order]
        same = ranked[1:] == ranked[:-1]
    dup = np.flatnonzero(same)
    if len(dup):
        raise ValueError(f"db ids must be unique: {len(dup)} duplicates, e.g. {ranked[dup[0]]!r}")
    return order


class Index:
    """A database in sharded FAISS indexes, built once and searched batch by batch: answers are the top-k rows per
    query as *keys*, each row's position in sorted id order (`sorted_ids[key]`; PAD_KEY where an approximate index
    left a slot empty), with their scores, ordered by score desc then id asc. Close it (or use `with`) to free the
    shards (Ray actors with the ray backend).

    `db_ids` (n,) and `db_vectors` (n, d) float32 (converted if not); or `db_ids=None` and `db_vectors` an iterable
    of (ids, vectors) chunks: with `max_shard_rows` set, shards of that many rows are built as the stream goes
    (so the whole database is never in this process at once with the ray backend; `shards` is then not used),
    without it the chunks are gathered and split into `shards`. Database ids must be unique. For the "flat" index
    the answers are the same for any shard count, batch size and backend."""

    def __init__(self, db_ids: np.ndarray | None,
                 db_vectors: np.ndarray | Iterable[tuple[np.ndarray, np.ndarray]], cfg: KnnConfig = KnnConfig()):
        t_start = time.perf_counter()
        self.cfg = cfg
        self._backend: _LocalBackend | _RayBackend = _RayBackend(cfg) if cfg.backend == "ray" else _LocalBackend(cfg)
        try:
            id_parts, self.n, self.d = self._add_shards(db_ids, db_vectors)
            if self.n == 0 or self.d is None or self.d == 0:
                raise ValueError("the database is empty: need at least one row with dim >= 1")
            # tie-break keys: a db row's rank in sorted id order (ids compare as strings when they are strings)
            all_ids = np.concatenate(id_parts) if len(id_parts) > 1 else id_parts[0]
            del id_parts
            order = _id_order(all_ids)
            self._rank_of_row = np.empty(self.n, np.int64)
            self._rank_of_row[order] = np.arange(self.n)
            self.sorted_ids = all_ids[order]  # the ids as given (numbers stay numbers)
            del order, all_ids
            self.k = min(cfg.k, self.n)
            self.shard_stats = self._backend.ready()
        except BaseException:
            self._backend.close()
            raise
        self._reservoir = _Reservoir(cfg.recall_sample if cfg.index != "flat" else 0, cfg.seed)
        self.timings = {"build_s": round(time.perf_counter() - t_start, 3), "search_s": 0.0, "queries": 0}

    def _add_shards(self, db_ids, db_vectors) -> tuple[list[np.ndarray], int, int | None]:
        cfg, backend = self.cfg, self._backend
        id_parts: list[np.ndarray] = []
        d: int | None = None
        n = 0
        chunks = _db_chunks(db_ids, db_vectors)
        if db_ids is None and cfg.max_shard_rows is not None:
            # one shard's buffer at a time, filled in place (np.empty pages are only resident once written);
            # a fresh buffer per shard, because a shard may keep its rows (ivf, GPU) and the local backend shares them
            buf: np.ndarray | None = None
            held = 0
            for ids, vec in chunks:
                d = vec.shape[1] if d is None else d
                if vec.shape[1] != d:
                    raise ValueError(f"db chunk dims differ: {vec.shape[1]} after {d}")
                id_parts.append(ids)
                s = 0
                while s < len(vec):
                    if buf is None:
                        buf = np.empty((cfg.max_shard_rows, d), np.float32)
                    take = min(cfg.max_shard_rows - held, len(vec) - s)
                    buf[held : held + take] = vec[s : s + take]
                    held += take
                    s += take
                    if held == cfg.max_shard_rows:
                        backend.add_shard(n, buf)
                        n += held
                        buf, held = None, 0
            if held:
                backend.add_shard(n, buf[:held])
                n += held
            return id_parts, n, d
        parts = list(chunks)
        for _, vec in parts:
            if d is not None and vec.shape[1] != d:
                raise ValueError(f"db chunk dims differ: {vec.shape[1]} after {d}")
            d = vec.shape[1]
        id_parts = [p[0] for p in parts]
        vectors = parts[0][1] if len(parts) == 1 else (np.concatenate([p[1] for p in parts]) if parts else None)
        del parts
        n = 0 if vectors is None else len(vectors)
        offset = 0
        for size in _shard_plan(n, cfg) if n else []:
            backend.add_shard(offset, vectors[offset : offset + size])
            offset += size
        return id_parts, n, d

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    def _merge(self, handle: Any) -> tuple[np.ndarray, np.ndarray]:
        results = self._backend.fetch(handle)
        keys = [np.where(rows >= 0, self._rank_of_row[np.maximum(rows, 0)], PAD_KEY) for _, rows in results]
        scores, keys = merge_topk([s for s, _ in results], keys, self.k)
        return keys, scores

    def search_batches(self, batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, scores), each (b, k), for each batch of query vectors, in order; with the ray backend up to
        `max_inflight_batches` batches are searched while earlier answers are consumed."""
        t0 = time.perf_counter()
        inflight: collections.deque[tuple[np.ndarray, Any]] = collections.deque()
        limit = self.cfg.max_inflight_batches if self.cfg.backend == "ray" else 1

        def answer() -> tuple[np.ndarray, np.ndarray]:
            q, handle = inflight.popleft()
            keys, scores = self._merge(handle)
            self._reservoir.add(q, keys)
            self.timings["queries"] += len(q)
            return keys, scores

        for q in batches:
            if q.shape[1] != self.d:
                raise ValueError(f"queries have dim {q.shape[1]}, the database has dim {self.d}")
            inflight.append((q, self._backend.submit(np.ascontiguousarray(q, np.float32), self.cfg.k)))
            while len(inflight) >= limit:
                yield answer()
        while inflight:
            yield answer()
        self.timings["search_s"] = round(self.timings["search_s"] + time.perf_counter() - t0, 3)

    def search(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores) of the queries `vectors` (b, d), searched in batches of `query_batch_size`."""
        size = self.cfg.query_batch_size
        answers = list(self.search_batches(vectors[s : s + size] for s in range(0, len(vectors), size)))
        if not answers:
            return np.empty((0, self.k), np.int64), np.empty((0, self.k), np.float32)
        return np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers])

    def above(self, vectors: np.ndarray, floors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores) of every database row whose exact score is at least its query's floor, (b, w) in no
        particular order, padded with PAD_KEY and -inf (see `_Shard.above`); one batch of queries."""
        results = self._backend.fetch(self._backend.submit(np.ascontiguousarray(vectors, np.float32), floors,
                                                           method="above"))
        keys = [np.where(rows >= 0, self._rank_of_row[np.maximum(rows, 0)], PAD_KEY) for _, rows in results]
        return np.concatenate(keys, axis=1), np.concatenate([s for s, _ in results], axis=1)

    def recall_at_k(self) -> float | None:
        """An approximate index's recall@k against exact search of the same shards, on a seeded sample of the
        queries searched so far (`recall_sample` of them); None for the exact "flat" index or before any search."""
        if not self._reservoir.vec:
            return None
        sample, approx = np.stack(self._reservoir.vec), np.stack(self._reservoir.keys)
        return _recall(approx, self._keys_of(sample, exact=True), self.k)

    @property
    def recall_queries(self) -> int:
        """How many queries `recall_at_k` measures on (the seeded sample drawn so far)."""
        return len(self._reservoir.vec)

    def _keys_of(self, vectors: np.ndarray, exact: bool = False) -> np.ndarray:
        """The answer keys of `vectors` (approximate, or by exact search of the same shards), outside the search's
        own accounts (its recall sample, its timings)."""
        size = self.cfg.query_batch_size
        return np.concatenate([self._merge(self._backend.submit(
            np.ascontiguousarray(vectors[s : s + size], np.float32), self.cfg.k, exact))[0]
            for s in range(0, len(vectors), size)])

    def set_knob(self, value: int) -> list[int]:
        """Set an approximate index's nprobe (ivf; each shard takes at most its nlist) or efSearch (hnsw) for the
        searches after this; the value each shard took."""
        return self._backend.call("set_knob", value)

    def tune(self, sample: np.ndarray, target: float) -> dict[str, Any]:
        """Set the approximate index's knob, nprobe (ivf) or efSearch (hnsw), to the smallest value whose recall@k
        on `sample` (query vectors) reaches `target`: doubled from 1 (ivf) or k (hnsw: a smaller efSearch is raised
        to the candidates asked for anyway) until it does, then bisected to within TUNE_RESOLUTION of the largest
        value that misses (each try is a search of the sample), as recall grows with the knob. IVF is exact at
        nprobe = nlist, so it always gets there; HNSW is tried up to TUNE_MAX_EF. The searches after this use the
        value; returns what was tried and chosen."""
        if self.cfg.index == "flat":
            raise ValueError("KnnConfig.target_recall: index 'flat' is exact; there is nothing to tune")
        t0 = time.perf_counter()
        ivf = self.cfg.index == "ivf"
        stats = self._backend.stats()
        top = max(s["nlist"] for s in stats) if ivf else min(TUNE_MAX_EF, max(s["rows"] for s in stats))
        exact = self._keys_of(sample, exact=True)
        tried: dict[int, float] = {}

        def recall(value: int) -> float:
            if value not in tried:
                self.set_knob(value)
                tried[value] = _recall(self._keys_of(sample), exact, self.k)
            return tried[value]

        hi = 1 if ivf else min(self.k, top)
        lo = hi - 1  # the largest value known to miss (or, at the start, not worth trying)
        while recall(hi) < target and hi < top:
            lo, hi = hi, min(2 * hi, top)
        if recall(hi) >= target:
            while hi - lo > max(1, int(lo * TUNE_RESOLUTION)):
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if recall(mid) >= target else (mid, hi)
        self.set_knob(hi)
        return {"knob": "nprobe" if ivf else "ef_search", "value": hi, "target_recall": target,
                "sample": len(sample), "sample_recall": round(tried[hi], 4), "reached": tried[hi] >= target,
                "tried": {str(v): round(r, 4) for v, r in sorted(tried.items())},
                "seconds": round(time.perf_counter() - t0, 3)}

    def ids_of(self, keys: np.ndarray) -> np.ndarray:
        """The ids of answer keys (object array; None for PAD_KEY)."""
        out = np.empty(len(self.sorted_ids) + 1, dtype=object)
        out[:-1] = self.sorted_ids.tolist()
        return out[np.where(keys == PAD_KEY, len(self.sorted_ids), keys)]

    def stats(self) -> list[dict[str, Any]]:
        stats = self._backend.stats()
        for built, now in zip(self.shard_stats, stats):
            now["build_s"] = built["build_s"]
        return stats


def search(db_ids: np.ndarray | None, db_vectors: np.ndarray | Iterable[tuple[np.ndarray, np.ndarray]],
           queries: Iterable[tuple[np.ndarray, np.ndarray]], cfg: KnnConfig = KnnConfig()) -> KnnResult:
    """Top-k database ids per query by inner product over sharded FAISS indexes, merged deterministically: an
    `Index` of the database (see there for `db_ids`/`db_vectors`) searched with the stream `queries` of
    (ids, vectors) batches (consumed once, re-batched to `query_batch_size`). Results are sorted by score desc
    then db id asc, and for the "flat" index are the same for any shard count, batch size and backend."""
    t_start = time.perf_counter()
    with Index(db_ids, db_vectors, cfg) as index:
        qid_parts: list[np.ndarray] = []

        def vectors() -> Iterator[np.ndarray]:
            for qids, qvec in _rebatch(_query_batches(queries, index.d), cfg.query_batch_size):
                qid_parts.append(qids)
                yield qvec

        answers = list(index.search_batches(vectors()))
        t_searched = time.perf_counter()
        keys = np.concatenate([a[0] for a in answers]) if answers else np.empty((0, index.k), np.int64)
        scores = np.concatenate([a[1] for a in answers]) if answers else np.empty((0, index.k), np.float32)
        query_ids = np.concatenate(qid_parts) if qid_parts else np.empty(0, dtype=object)
        recall = index.recall_at_k()
        t_end = time.perf_counter()
        stats = index.stats()
        timings = {"build_s": index.timings["build_s"], "search_s": index.timings["search_s"],
                   "recall_s": round(t_end - t_searched, 3),
                   "total_s": round(t_end - t_start, 3), "queries": len(keys), "shards": len(stats)}
        return KnnResult(query_ids=query_ids, ids=index.ids_of(keys), scores=scores, recall_at_k=recall,
                         shard_stats=stats, timings=timings)
