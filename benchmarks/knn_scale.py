"""Benchmark: the sharded knn stage on Ray actors against one in-process faiss.IndexFlatIP; prints JSON.

Default size is the task's: 1,000,000 database vectors of dim 512 and 10,000 queries, k=100. The database is the
image side of synthetic_embeddings.py's pairs (CLIP-shaped: topics, anisotropy, a text-image gap), the queries the
texts of its first rows (`--embeddings isotropic`: unit Gaussians, as before), generated in seeded chunks (never
whole in the driver for the sharded run); the baseline runs first in a spawned child process so that each side's
peak RSS is its own. If the size does not fit in the memory available, the database is shrunk to the largest that
does and the output says so.

    .venv/bin/python benchmarks/knn_scale.py                       # full size
    .venv/bin/python benchmarks/knn_scale.py --db 100000 --queries 2000 --shards 4

Two more modes, each in this process (the local backend):

    .venv/bin/python benchmarks/knn_scale.py --engines faiss,torch --db 100000 --dim 64   # exact search per engine
    .venv/bin/python benchmarks/knn_scale.py --index ivf --db 1000000 --dim 64 --queries 1000  # time against recall

--engines times an exact search with each engine over the same data and says whether their rankings are the same.
--index ivf|hnsw builds that index once, then searches all the queries at each --knobs value (nprobe or efSearch),
each row with its time and recall@k against the exact search (timed beside it), and what --target-recall chooses.
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
from pathlib import Path

import numpy as np


def _pairs(args: argparse.Namespace, first: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(texts, images) of rows first..first+rows-1; isotropic: unrelated unit Gaussians on both sides."""
    import synthetic_embeddings

    if args.embeddings == "isotropic":
        return (synthetic_embeddings.isotropic(first, rows, args.dim, args.seed + 1),
                synthetic_embeddings.isotropic(first, rows, args.dim, args.seed))
    texts, images, _ = synthetic_embeddings.pairs(first, rows, args.dim, args.seed)
    return texts, images


def db_chunks(args: argparse.Namespace, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for s in range(0, n, args.chunk):
        rows = min(args.chunk, n - s)
        yield np.array([f"img{j:08d}" for j in range(s, s + rows)], dtype=object), _pairs(args, s, rows)[1]


def make_queries(args: argparse.Namespace, n: int) -> np.ndarray:
    """The texts of the database's first rows (each query's own image is in the database), in its chunks."""
    parts, s = [], 0
    while sum(len(p) for p in parts) < args.queries:
        parts.append(_pairs(args, s, min(args.chunk, n - s))[0][: args.queries - sum(len(p) for p in parts)])
        s += args.chunk
    return np.concatenate(parts)


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
    for _, vec in db_chunks(args, n):
        index.add(vec)
    t1 = time.perf_counter()
    q = make_queries(args, n)
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
    p.add_argument("--embeddings", choices=["realistic", "isotropic"], default="realistic",
                   help="CLIP-shaped pairs (synthetic_embeddings.py) or unit Gaussians with no structure")
    p.add_argument("--engines", help="exact search with each of these engines (comma-separated: faiss,torch), "
                                     "in this process, instead of the sharded run")
    p.add_argument("--index", choices=["ivf", "hnsw"], help="time against recall of this index instead")
    p.add_argument("--knobs", help="--index: the nprobe / efSearch values, comma-separated "
                                   "(default ivf 1,2,4,...,256; hnsw 100,128,256,...,2048)")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--target-recall", type=float, default=0.95, help="--index: also what knn.target_recall chooses")
    p.add_argument("--repeats", type=int, default=1, help="--engines: runs of each engine, in turn; the best kept")
    p.add_argument("--threads", type=int, default=0, help="--engines/--index: FAISS and torch threads (0: default)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.engines or args.index:
        result = in_process(args)
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        return result

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
        qv = make_queries(args, n)
        qids = np.arange(args.queries)

        def query_stream():
            for s in range(0, len(qv), 1000):  # arrives in 1000-row pieces; the engine re-batches
                yield qids[s : s + 1000], qv[s : s + 1000]

        with PeakSampler() as sampler:
            t0 = time.perf_counter()
            res = search(None, db_chunks(args, n), query_stream(), cfg)
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
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _machine() -> dict:
    import psutil  # the `test` extra (pyproject.toml)

    return {"cpus": os.cpu_count(), "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def in_process(args: argparse.Namespace) -> dict:
    """--engines or --index: the database and queries in this process, searched by `Index` (local backend)."""
    from newsclip.retrieval.search import PAD_KEY, Index, KnnConfig

    if args.threads:
        import faiss
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    engines = args.engines.split(",") if args.engines else ["auto"]
    if "torch" in engines:
        import torch  # noqa: F401 - imported before the clock starts: its import is seconds, not the engine's build
    t0 = time.perf_counter()
    ids, vectors = zip(*db_chunks(args, args.db))
    ids, vectors = np.concatenate(ids), np.concatenate(vectors)
    queries = make_queries(args, args.db)
    result = {"machine": _machine(), "embeddings": args.embeddings,
              "size": {"db": args.db, "queries": len(queries), "dim": args.dim, "k": args.k, "shards": args.shards},
              "generate_s": round(time.perf_counter() - t0, 2)}

    def timed(cfg: KnnConfig, index: Index | None = None) -> tuple[dict, np.ndarray, Index]:
        t = time.perf_counter()
        index = index or Index(ids, vectors, cfg)
        built = time.perf_counter()
        keys, _ = index.search(queries)
        done = time.perf_counter()
        row = {"build_s": round(built - t, 3), "search_s": round(done - built, 3),
               "queries_per_s": round(len(queries) / (done - built), 1),
               "pairs_per_s": float(f"{len(queries) * args.db / (done - built):.3g}")}
        return row, keys, index

    base = {"k": args.k, "shards": args.shards, "query_batch_size": args.query_batch_size}
    exact: dict[str, tuple[dict, np.ndarray]] = {}
    for _ in range(args.repeats):  # the engines in turn, each run's best kept: others share these CPUs
        for engine in engines:
            row, keys, index = timed(KnnConfig(engine=engine, **base))
            row["engine"] = index.shard_stats[0]["engine"]
            index.close()
            if engine not in exact or row["search_s"] < exact[engine][0]["search_s"]:
                exact[engine] = row, keys
    result["exact"] = {engine: row for engine, (row, _) in exact.items()}
    first = engines[0]
    if len(engines) > 1:
        result["same_rankings"] = {e: bool(np.array_equal(exact[e][1], exact[first][1])) for e in engines[1:]}
        result["search_s_over_" + first] = {e: round(exact[e][0]["search_s"] / exact[first][0]["search_s"], 3)
                                            for e in engines[1:]}
    if not args.index:
        return result
    truth = exact[first][1]

    def recall(keys: np.ndarray) -> float:
        hits = [len(np.intersect1d(a[a != PAD_KEY], e)) for a, e in zip(keys, truth)]
        return round(float(np.mean(hits)) / truth.shape[1], 4)

    knob = "nprobe" if args.index == "ivf" else "ef_search"
    knobs = ([int(v) for v in args.knobs.split(",")] if args.knobs else
             [2**i for i in range(9)] if args.index == "ivf" else [100, 128, 256, 512, 1024, 2048])
    cfg = KnnConfig(index=args.index, nlist=args.nlist, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                    recall_sample=min(1000, len(queries)), **base)
    index = Index(ids, vectors, cfg)
    result["approximate"] = {"index": args.index, "nlist": args.nlist if args.index == "ivf" else None,
                             "hnsw_m": args.hnsw_m if args.index == "hnsw" else None,
                             "ef_construction": args.ef_construction if args.index == "hnsw" else None,
                             "build_s": index.timings["build_s"], "curve": []}
    done: set[int] = set()
    for value in knobs:
        took = max(index.set_knob(value))  # nprobe stops at a shard's nlist
        if took in done:
            continue
        done.add(took)
        row, keys, _ = timed(cfg, index)
        del row["build_s"], row["pairs_per_s"]
        result["approximate"]["curve"].append({knob: took, **row, "recall_at_k": recall(keys),
                                               "search_s_over_exact": round(row["search_s"] /
                                                                            exact[first][0]["search_s"], 3)})
        print(json.dumps(result["approximate"]["curve"][-1]), file=sys.stderr, flush=True)
    # what knn.target_recall picks on a seeded sample of other queries: texts drawn as the timed ones are (their own
    # images are not in the database), not the queries whose recall is then measured
    sample = _pairs(args, len(queries), min(1000, args.db - len(queries)))[0] if args.db > len(queries) else queries
    tuning = index.tune(sample, args.target_recall)
    row, keys, _ = timed(cfg, index)
    result["approximate"]["target_recall"] = {**tuning, "search_s": row["search_s"], "recall_at_k": recall(keys)}
    index.close()
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
