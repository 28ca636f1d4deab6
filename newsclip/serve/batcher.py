"""Concurrent queries gathered into one batch: one worker thread takes every query waiting, encodes the texts of each
backbone in one call and searches them with one matrix product, so that 50 queries a second cost a few passes over
the rows instead of 50 (a pass over 1M x 64 float32 rows is ~250 MB of memory traffic, whatever the batch)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from newsclip.serve.index import Snapshot
from newsclip.serve.query import QueryEncoders, QueryError

MAX_BATCH = 64  # queries taken at once: a larger batch would only add to the wait of its first


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


class Batcher:
    """`submit` a Query, get a Future of its [(id, score), ...], best first."""

    def __init__(self, encoders: QueryEncoders, max_batch: int = MAX_BATCH):
        self.encoders, self.max_batch = encoders, max_batch
        self._queue: queue.SimpleQueue[Query | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # batches run, and the queries in them: what a benchmark reports
        self.queries = 0

    def submit(self, query: Query) -> Future:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="newsclip-batcher", daemon=True)
                self._thread.start()
        self._queue.put(query)
        return query.future

    def search(self, query: Query) -> list[tuple[str, float]]:
        """Submit and wait (for callers outside an event loop)."""
        return self.submit(query).result()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            self.batches += 1
            self.queries += len(batch)
            groups: dict[tuple, list[Query]] = {}
            for q in batch:
                groups.setdefault((id(q.snapshot), q.backbone, q.target, q.text is None), []).append(q)
            for group in groups.values():
                try:
                    self._run(group)
                except BaseException as e:  # noqa: BLE001 - every caller gets the error, the worker goes on
                    for q in group:
                        if not q.future.done():
                            q.future.set_exception(e)

    def _run(self, group: list[Query]) -> None:
        head = group[0]
        index = head.snapshot.backbones[head.backbone]
        if head.text is not None:
            vectors = self.encoders.texts(index, [q.text for q in group])
        else:
            vectors, errors = self.encoders.images(index, [q.image for q in group])
            bad = [i for i, e in enumerate(errors) if e is not None]
            for i in bad:
                group[i].future.set_exception(QueryError(f"image: {errors[i]}"))
            keep = np.array([i for i in range(len(group)) if i not in set(bad)], np.int64)
            group, vectors = [group[i] for i in keep], vectors[keep]
            if not group:
                return
        side = index.images if head.target == "images" else index.texts
        answers = side.nearest(vectors, max(q.k for q in group))
        for q, answer in zip(group, answers):
            q.future.set_result(answer[: q.k])
