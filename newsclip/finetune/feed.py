"""What each Ray Train rank trains on, as a function of (seed, epoch, step) alone: every epoch is a seeded shuffle of
the whole train split, cut into steps and each step into the ranks' micro-batches; Ray tasks decode a rank's
micro-batches a few ahead and hand them over in order, whatever order they finish in. So a resumed run (its
checkpoint holds the epoch and the step) trains on exactly the pairs an undisturbed run would.

Runs in the train workers: no polars, no faiss."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from newsclip.finetune.config import FinetuneConfig

# micro-batches a rank has in decoding at once: a news photo takes a core ~8 ms, so a micro-batch of 256 ~2 s; 8
# tasks keep a GPU step of ~0.3 s fed where the node has the cores, and bound what waits in the object store
AHEAD = 8


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The train split's rows in an epoch's order: a seeded permutation of all of them."""
    return np.random.default_rng([seed, 6, epoch]).permutation(rows)


def steps_per_epoch(rows: int, ft: FinetuneConfig) -> int:
    """Whole steps in an epoch: each takes batch_size x workers x grad_accum pairs of its order (the rest of an
    epoch's order, fewer than one step, waits for the next epoch's shuffle)."""
    return rows // (ft.batch_size * ft.workers * ft.grad_accum)


def micro_rows(order: np.ndarray, step: int, micro: int, rank: int, ft: FinetuneConfig) -> np.ndarray:
    """The rows of micro-batch `micro` of step `step` of an epoch (counted from the epoch's start) on `rank`."""
    start = ((step * ft.grad_accum + micro) * ft.workers + rank) * ft.batch_size
    return order[start:start + ft.batch_size]


def train_plan(rows: int, ft: FinetuneConfig, epoch: int, first_step: int, rank: int) -> Iterator[np.ndarray]:
    """A rank's micro-batches of an epoch from step `first_step` on (a resumed epoch starts where it stopped)."""
    order = epoch_order(rows, ft.seed, epoch)
    for step in range(first_step, steps_per_epoch(rows, ft)):
        for micro in range(ft.grad_accum):
            yield micro_rows(order, step, micro, rank, ft)


def validation_plan(rows: int, batch_size: int, rank: int, world: int) -> Iterator[np.ndarray]:
    """A rank's validation batches: the split's rows in their order, batch j on rank j % world."""
    for start in range(rank * batch_size, rows, world * batch_size):
        yield np.arange(start, min(start + batch_size, rows))


class Feed:
    """Decoded micro-batches of one rank in the order of a plan of row positions into `table` (query_text,
    image_id, file): Ray tasks decode up to AHEAD of them at a time."""

    def __init__(self, table: pa.Table, decode_kwargs: dict, retries: int):
        import ray

        from newsclip.finetune.data import decode_pairs

        self.table, self.kwargs = table, decode_kwargs
        self.decode = ray.remote(num_cpus=1, max_retries=retries)(decode_pairs)

    def batches(self, plan: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """{pixels, tokens} per planned micro-batch, in plan order (fewer rows where an image no longer decodes)."""
        import ray

        plan, pending = iter(plan), deque()

        def submit() -> None:
            rows = next(plan, None)
            if rows is not None:
                pending.append(self.decode.remote(self.table.take(pa.array(rows)), **self.kwargs))

        for _ in range(AHEAD):
            submit()
        try:
            while pending:
                ref = pending.popleft()
                submit()
                yield ray.get(ref)
        finally:  # an epoch cut short, training stopped: what is still decoding is not needed
            for ref in pending:
                ray.cancel(ref)
