"""Benchmark: the sharded knn stage on Ray actors against one in-process faiss.IndexFlatIP; prints JSON.

Default size is the task's: 1,000,000 database vectors of dim 512 and 10,000 queries, k=100. The database is
generated in seeded chunks (never whole in the driver for the sharded run); the baseline runs first in a spawned
child process so that each side's peak RSS is its own. If the size does not fit in the memory available, the
database is shrunk to the largest that does and the output says so.

    .venv/bin/python benchmarks/knn_scale.py                       # full size
    .venv/bin/python benchmarks/knn_scale.py --db 100000 --queries 2000 --shards 4
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator

import numpy as np


def _chunk(seed: int, i: int, rows: int, dim: int) -> np.ndarray:
    x = np.random.default_rng([seed, i]).standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def db_chunks(n: int, dim: int, chunk: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i, s in enumerate(range(0, n, chunk)):
        rows = min(chunk, n - s)
        yield np.array([f"img{j:08d}" for j in range(s, s + rows)], dtype=object), _chunk(seed, i, rows, dim)


def make_queries(nq: int, dim: int, seed: int) -> np.ndarray:
    return _chunk(seed + 1_000_003, 0, nq, dim)


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


class PeakSampler:
    """Samples this process's anonymous (private heap) and shared-memory (object store) RSS while on."""

    def __init__(self, every_s: float = 0.1) -> None:
        import threading

        self.every_s = every_s
        self.peak_anon = self.peak_shmem = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from newsclip.retrieval.search import process_memory

        while not self._stop.is_set():
            mem = process_memory()
            self.peak_anon = max(self.peak_anon, mem.get("anon_mib", 0.0))
            self.peak_shmem = max(self.peak_shmem, mem.get("shmem_mib", 0.0))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def baseline(args: argparse.Namespace, n: int, out: mp.Queue) -> None:
    """Single process: one IndexFlatIP over the whole database, all queries in one search call."""
    import faiss

    if args.baseline_threads:
        faiss.omp_set_num_threads(args.baseline_threads)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    for _, vec in db_chunks(n, args.dim, args.chunk, args.seed):
        index.add(vec)
    t1 = time.perf_counter()
    q = make_queries(args.queries, args.dim, args.seed)
    dist, lab = index.search(q, args.k)
    t2 = time.perf_counter()
    out.put({"build_s": round(t1 - t0, 3), "search_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
                 "faiss_threads": faiss.omp_get_max_threads(), "peak_rss_mib": _peak_rss_mib(),
                 "index_mib": round(index.ntotal * args.dim * 4 / 2**20, 1), "labels": lab, "scores": dist})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=int, default=1_000_000, help="database vectors")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--num-cpus-per-actor", type=float, default=None, help="default: the CPUs / shards")
    p.add_argument("--query-batch-size", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=50_000, help="rows per generated database chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true")
    # on a loaded machine faiss's OpenMP threads spin at barriers: 1 thread can beat 2 on 2 busy cores
    p.add_argument("--baseline-threads", type=int, default=0, help="faiss threads for the baseline (0: faiss default)")
    args = p.parse_args(argv)

    import psutil  # the `test` extra (pyproject.toml)
    import ray

    from newsclip.retrieval.search import KnnConfig, search

    ncpu = os.cpu_count() or 1
    avail = psutil.virtual_memory().available
    # peak need ~3 copies of the database: the baseline's index (alone, first), then the actors' indexes plus the
    # object-store copy of a shard while it builds plus the driver's one shard buffer; keep 25% of RAM spare
    n = args.db
    per_row = args.dim * 4
    fit = int(0.75 * avail / (3 * per_row))
    note = None
    if n > fit:
        note = f"--db {n} needs ~{3 * n * per_row / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available: shrunk to {fit}"
        n = fit
    cpus_per_actor = args.num_cpus_per_actor if args.num_cpus_per_actor is not None else ncpu / args.shards

    result: dict = {
        "machine": {"cpus": ncpu, "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
                     "mem_available_gib": round(avail / 2**30, 1), "python": platform.python_version()},
        "size": {"db": n, "queries": args.queries, "dim": args.dim, "k": args.k,
                 "db_gib": round(n * per_row / 2**30, 2)},
        "note": note,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],  # others share these CPUs: timings are noisy
    }

    base = None
    if not args.skip_baseline:
        ctx = mp.get_context("spawn")
        q: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=baseline, args=(args, n, q))
        proc.start()
        base = q.get()
        proc.join()
        result["baseline_single_indexflatip"] = {k: v for k, v in base.items() if k not in ("labels", "scores")}

    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False)
    try:
        cfg = KnnConfig(k=args.k, shards=args.shards, max_shard_rows=math.ceil(n / args.shards),
                        query_batch_size=args.query_batch_size, backend="ray", num_cpus_per_actor=cpus_per_actor)
        qv = make_queries(args.queries, args.dim, args.seed)
        qids = np.arange(args.queries)

        def query_stream():
            for s in range(0, len(qv), 1000):  # arrives in 1000-row pieces; the engine re-batches
                yield qids[s : s + 1000], qv[s : s + 1000]

        with PeakSampler() as sampler:
            t0 = time.perf_counter()
            res = search(None, db_chunks(n, args.dim, args.chunk, args.seed), query_stream(), cfg)
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    keep = ("rows", "build_s", "peak_rss_mib", "rss_mib", "anon_mib", "shmem_mib", "nice")
    actors = [{k: s.get(k) for k in keep} for s in res.shard_stats]
    result["sharded_ray"] = {
        "shards": len(res.shard_stats), "num_cpus_per_actor": cpus_per_actor, "query_batch_size": args.query_batch_size,
        "build_s": res.timings["build_s"], "search_s": res.timings["search_s"], "total_s": round(wall, 3),
        "driver_peak_rss_mib": _peak_rss_mib(), "driver_peak_anon_mib_sampled": sampler.peak_anon,
        "driver_peak_shmem_mib_sampled": sampler.peak_shmem,
        "actors": actors,
        "actor_peak_rss_mib_max": max(a["peak_rss_mib"] for a in actors),
    }
    if base is not None:
        ids = np.array([[f"img{j:08d}" for j in row] for row in base["labels"]], dtype=object)
        same = float(np.mean(res.ids == ids))
        result["ratio_sharded_over_baseline"] = {
            "search": round(res.timings["search_s"] / base["search_s"], 3), "total": round(wall / base["total_s"], 3)}
        result["agreement_with_baseline"] = {
            "same_id_at_same_rank": round(same, 6),
            "max_abs_score_diff": float(np.abs(res.scores - base["scores"]).max())}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
