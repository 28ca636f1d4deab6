"""An external sort by one key column: rows stream in, split by key range into spill files, and come back one range
at a time, sorted."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc


class ExternalSort:
    """Rows sorted by their `key` column holding one range of keys in memory, never all the rows.

    Every key the rows will hold (`keys`) is known up front, so the ranges are cut where each holds `range_rows`
    rows (more only where keys repeat). Rows go to the Arrow file of their range under `folder` as they come;
    `ranges` then reads back one range at a time, sorted. When every row fits one range nothing is spilled: the
    rows are held until `ranges`. Memory: one batch while rows come (one range when they fit one), one range after.
    As a context manager it removes its spill files however the block ends."""

    def __init__(self, folder: Path, key: str, keys: pa.Array | pa.ChunkedArray | pl.Series, range_rows: int):
        self.folder, self.key = folder, key
        keys = keys if isinstance(keys, pl.Series) else pl.Series(keys)
        # the first key of ranges 1, 2, ...: a row goes to the range of the last bound at or below its key
        self.bounds = keys.sort().gather(range(range_rows, len(keys), range_rows))
        self._held: list[pa.Table] = []
        self._written: list[int] = []  # the ranges that have a spill file
        self._writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}  # those still open

    def add(self, rows: pa.Table | pa.RecordBatch) -> None:
        """Take `rows` (of one schema throughout) into their ranges."""
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        if not len(self.bounds):
            self._held.append(rows)
            return
        which = self.bounds.search_sorted(pl.Series(rows.column(self.key)), side="right").to_numpy()
        for index in np.unique(which).tolist():
            if index not in self._writers:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._writers[index] = pa.ipc.new_file(self._path(index), rows.schema)
                self._written.append(index)
            self._writers[index].write(rows.filter(pa.array(which == index)))

    def ranges(self) -> Iterator[pa.Table]:
        """Each range that holds rows, in key order, as one table (one chunk) sorted by key (stable); the spill
        files are gone once the last is read."""
        if self._held:
            table = pa.concat_tables(self._held)
            self._held = []
            if len(table):
                yield _sorted(table, self.key)
            return
        self._close()
        for index in sorted(self._written):
            yield _sorted(pa.ipc.open_file(self._path(index)).read_all(), self.key)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ExternalSort:
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        self._held = []
        shutil.rmtree(self.folder, ignore_errors=True)

    def _close(self) -> None:
        while self._writers:
            self._writers.popitem()[1].close()

    def _path(self, index: int) -> Path:
        return self.folder / f"range-{index:05d}.arrow"


def _sorted(table: pa.Table, key: str) -> pa.Table:
    return table.take(pc.sort_indices(table.column(key))).combine_chunks()
