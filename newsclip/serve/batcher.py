"""Concurrent queries gathered into batches, in two stages that overlap: an encoder thread takes every query waiting
and encodes the texts (or images) of each backbone in one call; a search thread takes every encoded query waiting and
searches each backbone's in one pass over its rows, whose steps a pool of step threads (STEP_THREADS, one per core)
shares out. A query that comes during a pass goes into the next one with the others waiting: at 1M x 64 rows a pass
took 6 ms for one query, 12 for two (one core, the int8 pass), 37 for eight (the float32 product), and the next
queries are encoded meanwhile."""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from newsclip.serve.index import Snapshot
from newsclip.serve.query import QueryEncoders, QueryError

MAX_BATCH = 64  # queries taken at once: a larger batch would only add to the wait of its first
# step threads: one per core, up to a few (a Ray Serve replica sees every core of its node). Each takes the pass's
# next step when it is free, so a core busy with the encoder or a request holds back only the step it is on. On the
# quiet 2-core machine at 1M rows, paired runs in the same minutes: p50 25-34 ms and p99 79-108 ms, against 34-35 and
# 109-172 ms for the design before (a search thread per core, each pass on one core; a pass split in two fixed halves
# was slower still: a half delayed by the encoder delayed the whole pass)
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
STEP_THREADS = min(4, _CORES)


@dataclass
class Query:
    """One search: a text or an image, against one backbone of one snapshot (the one its request started with)."""

    snapshot: Snapshot
    backbone: str
    k: int
    text: str | None = None
    image: bytes | None = None
    target: str = "images"  # images | articles (the text side: an image's articles)
    future: Future = field(default_factory=Future)


def _drain(source: queue.SimpleQueue, first, limit: int) -> tuple[list, bool]:
    """`first` and whatever else is waiting, up to `limit`; and whether the stop mark (None) came."""
    taken, stop = [first], False
    while len(taken) < limit:
        try:
            more = source.get_nowait()
        except queue.Empty:
            break
        if more is None:
            stop = True
            break
        taken.append(more)
    return taken, stop


def _fail(queries: list[Query], error: BaseException) -> None:
    for q in queries:
        if not q.future.done():
            q.future.set_exception(error)


class Batcher:
    """`submit` a Query, get a Future of its [(id, score), ...], best first."""

    def __init__(self, encoders: QueryEncoders, max_batch: int = MAX_BATCH, step_threads: int = STEP_THREADS):
        self.encoders, self.max_batch, self.step_threads = encoders, max_batch, step_threads
        self._queries: queue.SimpleQueue[Query | None] = queue.SimpleQueue()
        self._encoded: queue.SimpleQueue[tuple[list[Query], np.ndarray] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._steps: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.batches = 0  # matrix products run, and the queries in them: what a benchmark reports
        self.queries = 0
        self.encode_s = 0.0  # seconds the two stages worked (wall)
        self.search_s = 0.0

    def submit(self, query: Query) -> Future:
        with self._lock:
            if not self._threads:
                _blas_threads.limit()
                if self.step_threads > 1:
                    self._steps = ThreadPoolExecutor(self.step_threads, thread_name_prefix="newsclip-search-step")
                self._threads = [threading.Thread(target=self._encode_loop, name="newsclip-encode", daemon=True),
                                 threading.Thread(target=self._search_loop, name="newsclip-search", daemon=True)]
                for thread in self._threads:
                    thread.start()
        self._queries.put(query)
        return query.future

    def search(self, query: Query) -> list[tuple[str, float]]:
        """Submit and wait (for callers outside an event loop)."""
        return self.submit(query).result()

    def close(self) -> None:
        with self._lock:
            if self._threads:
                self._queries.put(None)  # the encoder passes it on to the search thread
                for thread in self._threads:
                    thread.join()
                self._threads = []
                if self._steps is not None:
                    self._steps.shutdown()
                    self._steps = None
                _blas_threads.release()

    def _encode_loop(self) -> None:
        stop = False
        while not stop:
            first = self._queries.get()
            if first is None:
                break
            batch, stop = _drain(self._queries, first, self.max_batch)
            groups: dict[tuple, list[Query]] = {}
            for q in batch:
                groups.setdefault((id(q.snapshot), q.backbone, q.text is None), []).append(q)
            for group in groups.values():
                started = time.perf_counter()
                try:
                    encoded = self._encode(group)
                except BaseException as e:  # noqa: BLE001 - every caller gets the error, the worker goes on
                    _fail(group, e)
                    continue
                finally:
                    self.encode_s += time.perf_counter() - started
                if encoded is not None:
                    self._encoded.put(encoded)
        self._encoded.put(None)

    def _encode(self, group: list[Query]) -> tuple[list[Query], np.ndarray] | None:
        head = group[0]
        index = head.snapshot.backbones[head.backbone]
        if head.text is not None:
            return group, self.encoders.texts(index, [q.text for q in group])
        vectors, errors = self.encoders.images(index, [q.image for q in group])
        for q, error in zip(group, errors):
            if error is not None:
                q.future.set_exception(QueryError(f"image: {error}"))
        keep = [i for i, error in enumerate(errors) if error is None]
        return ([group[i] for i in keep], vectors[keep]) if keep else None

    def _search_loop(self) -> None:
        stop = False
        while not stop:
            first = self._encoded.get()
            if first is None:
                break
            ready, stop = _drain(self._encoded, first, self.max_batch)
            groups: dict[tuple, list[tuple[list[Query], np.ndarray]]] = {}
            for queries, vectors in ready:
                for target in ("images", "articles"):
                    rows = [i for i, q in enumerate(queries) if q.target == target]
                    if rows:
                        key = (id(queries[0].snapshot), queries[0].backbone, target)
                        groups.setdefault(key, []).append(([queries[i] for i in rows], vectors[rows]))
            for parts in groups.values():
                queries = [q for qs, _ in parts for q in qs]
                try:
                    self._search(queries, np.concatenate([v for _, v in parts]))
                except BaseException as e:  # noqa: BLE001 - every caller gets the error, the worker goes on
                    _fail(queries, e)

    def _search(self, queries: list[Query], vectors: np.ndarray) -> None:
        head = queries[0]
        index = head.snapshot.backbones[head.backbone]
        side = index.images if head.target == "images" else index.texts
        started = time.perf_counter()
        answers = side.nearest(vectors, max(q.k for q in queries), self._steps.map if self._steps else map)
        self.batches += 1  # only this thread writes them
        self.queries += len(queries)
        self.search_s += time.perf_counter() - started
        for q, answer in zip(queries, answers):
            q.future.set_result(answer[: q.k])


class _BlasThreads:
    """OpenBLAS at one thread while a Batcher runs (and as it was once the last one closes): each step thread runs
    its own products, and BLAS's threads (2 on 2 cores) made a product no faster but busy-waited on the cores the
    encoder and the other step threads needed (the server's CPU per query: 34.5 ms with them, 25.4 without)."""

    def __init__(self):
        self._lock, self._users, self._limits = threading.Lock(), 0, None

    def limit(self) -> None:
        from threadpoolctl import threadpool_limits

        with self._lock:
            if self._users == 0:
                self._limits = threadpool_limits(1, user_api="blas")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._limits.restore_original_limits()


_blas_threads = _BlasThreads()
