"""Embeddings folders read for a kNN search in bounded memory: the database side streamed once per id, the query side
in id order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.runtime.external_sort import ExternalSort
from newsclip.runtime.store import parquet_files, read_batches, vectors_of

# query vectors held at once while they are put in id order: more go through spill files, one per id range
ORDER_BYTES = 64 * 2**20


class DatabaseFolder:
    """The database side of an embeddings folder: its (id, hash) table, read whole, and its vectors, read as a
    stream of (ids, vectors) chunks, so that with `knn.max_shard_rows` (and `backend: ray`) the driver never holds
    them all. An id encoded twice (duplicate input rows) counts once."""

    def __init__(self, folder: Path, id_column: str):
        self.files, self.id_column = parquet_files(folder, f"embeddings {folder}"), id_column
        table = pq.read_table(self.files, columns=[id_column, "hash"])
        _, first = np.unique(table.column(id_column).to_numpy(zero_copy_only=False), return_index=True)
        self.first = np.zeros(len(table), bool)
        self.first[first] = True
        table = table.filter(pa.array(self.first))
        self.table = pa.table({"id": table.column(id_column).cast(pa.string()),
                               "hash": table.column("hash").cast(pa.string())})

    def chunks(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every row, or of those `rows` (a mask over `table`) picks, in `table` order."""
        seen = kept = 0
        for path in self.files:
            for batch in read_batches(path, columns=[self.id_column, "embedding"]):
                first = mask = self.first[seen : seen + batch.num_rows]
                seen += batch.num_rows
                if rows is not None:
                    mask = first.copy()
                    mask[first] = rows[kept : kept + int(first.sum())]
                    kept += int(first.sum())
                batch = batch.filter(pa.array(mask))
                if batch.num_rows:
                    yield (batch.column(self.id_column).to_numpy(zero_copy_only=False),
                           vectors_of(batch.column("embedding")))


def in_id_order(folder: Path, id_column: str, batch_rows: int, spill: Path) -> Iterator[pa.Table]:
    """The (id, embedding, hash) rows of an embeddings folder in id order, `batch_rows` at a time, holding at most
    ORDER_BYTES of vectors: a larger folder is first split by id range into files under `spill` (an external
    sort), which are gone when the rows are."""
    files = parquet_files(folder, f"embeddings {folder}")
    dim = pq.read_schema(files[0]).field("embedding").type.list_size
    ids = pq.read_table(files, columns=[id_column]).column(id_column)
    with ExternalSort(spill, id_column, ids, max(batch_rows, ORDER_BYTES // (4 * max(dim, 1)))) as rows:
        del ids
        for path in files:
            for batch in read_batches(path, columns=[id_column, "embedding", "hash"]):
                rows.add(batch)
        for table in rows.ranges():
            for start in range(0, len(table), batch_rows):
                yield table.slice(start, batch_rows)


def sample_vectors(folder: Path, size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of `size` rows' vectors (all of them when there are fewer) of an embeddings folder,
    read forward a batch at a time: what `Index.tune` chooses an approximate index's knob on."""
    files = parquet_files(folder, f"embeddings {folder}")
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    wanted = np.sort(np.random.default_rng(seed).choice(total, min(size, total), replace=False))
    parts, seen = [], 0
    for path in files:
        for batch in read_batches(path, columns=["embedding"]):
            lo, hi = np.searchsorted(wanted, [seen, seen + batch.num_rows])
            if hi > lo:
                parts.append(vectors_of(batch.column("embedding"))[wanted[lo:hi] - seen])
            seen += batch.num_rows
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
