"""Rows spread over partitions (by key hash or key range) in Arrow spill files, and one function run per partition:
in this process for a small input, else as Ray tasks. The driver holds counts and file names, never the rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from newsclip.runtime.console import progress
from newsclip.runtime.ray_setup import ensure_ray

HASH_SEED = 27  # fixed: every task of a run must send a key to the same partition
# Rows of one partition of a stage's work at most (a hash or key range holds about this many): a big input is spread
# over ceil(rows / PART_ROWS) partitions, each a Ray task's work; at most `ray.inline_rows` rows are worked on in the
# driver, the same functions over the same partitions. A task holds about 300 B a row of its partition.
PART_ROWS = 250_000
# one key in this many is kept to cut key ranges of about equal size (`quantile_bounds`)
SAMPLE_EVERY = 512
# rows of one range of input positions, in which prepare's driver writes prepared/articles.parquet in input order:
# it holds one range (about 1.2 KB a row with the copies a range goes through)
OUT_ROWS = 32_768


def hash_partitions(keys: pl.Series, parts: int) -> np.ndarray:
    """The partition of each key, by hash (a null key too: all nulls go to one partition)."""
    if parts == 1:
        return np.zeros(len(keys), np.int64)
    return (keys.hash(HASH_SEED) % parts).cast(pl.Int64).to_numpy()


def range_partitions(keys: pl.Series, bounds: pl.Series) -> np.ndarray:
    """The range of each key: the number of `bounds` (sorted) at or below it."""
    if not len(bounds):
        return np.zeros(len(keys), np.int64)
    return bounds.search_sorted(keys, side="right").cast(pl.Int64).to_numpy()


def quantile_bounds(sample: pl.Series, parts: int) -> pl.Series:
    """At most `parts - 1` sorted keys that cut a sample of the keys into `parts` ranges of about equal size."""
    sample = sample.drop_nulls().sort()
    if parts <= 1 or not len(sample):
        return sample.clear()
    return sample.gather([len(sample) * i // parts for i in range(1, parts)]).unique(maintain_order=True)


class Spill:
    """Writes rows to `folder/<partition>/<name>.arrow`, one open file per partition that gets rows; the readers
    (`gather`) read a partition's files in the order of their names."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self._writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        self.rows: dict[int, int] = {}

    def add(self, rows: pl.DataFrame, which: np.ndarray) -> None:
        table = rows.to_arrow()
        for part in np.unique(which).tolist():
            chunk = table.filter(pa.array(which == part))
            if part not in self._writers:
                path = self.folder / f"{part:05d}" / f"{self.name}.arrow"
                path.parent.mkdir(parents=True, exist_ok=True)
                self._writers[part] = pa.ipc.new_file(path, chunk.schema)
            self._writers[part].write(chunk)
            self.rows[part] = self.rows.get(part, 0) + len(chunk)

    def close(self) -> dict[int, int]:
        """Close every file; the rows written per partition."""
        while self._writers:
            self._writers.popitem()[1].close()
        return self.rows

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gather(folder: Path, part: int, schema: dict) -> pl.DataFrame:
    """Every row spilled to partition `part` under `folder`, file after file in name order; `schema` when none."""
    files = sorted((folder / f"{part:05d}").glob("*.arrow"))
    frames = [pl.from_arrow(pa.ipc.open_file(f).read_all()) for f in files]
    frames = [f for f in frames if len(f)]
    return pl.concat(frames).rechunk() if frames else pl.DataFrame(schema=schema)


def batches(folder: Path, part: int) -> Iterator[pa.Table]:
    """The rows spilled to partition `part` under `folder` a written batch at a time, file after file in name order."""
    for file in sorted((folder / f"{part:05d}").glob("*.arrow")):
        reader = pa.ipc.open_file(file)
        for index in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(index)])


def run_parts(cfg, fn: Callable, calls: list[tuple], inline: bool, unit: str, **shared) -> list:
    """`fn(*call, **shared)` for each call, in order: in this process when `inline`, else as Ray tasks (one CPU
    each, `ray.max_task_retries` retries) whose `shared` arguments are put in the object store once."""
    if inline:
        return [fn(*call, **shared) for call in calls]
    import ray

    ensure_ray(cfg.ray)
    shared = {key: ray.put(value) for key, value in shared.items()}
    task = ray.remote(num_cpus=1, max_retries=cfg.ray.max_task_retries)(fn)
    refs = [task.remote(*call, **shared) for call in calls]
    pending = refs
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1)
        progress(len(refs) - len(pending), len(refs), unit=unit)
    return ray.get(refs)


def frames(folder: Path, parts: Iterable[int], schema: dict) -> Iterator[pl.DataFrame]:
    """`gather` of each partition in turn."""
    for part in parts:
        yield gather(folder, part, schema)
