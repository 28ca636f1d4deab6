"""Rows of a Parquet shard by id, read by the worker that needs them (only the row groups that hold them), so that
what the driver sends a worker is a file name and ids, never the rows themselves."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def rows_by_id(file: str, id_column: str, ids: list[str], columns: list[str]) -> pa.Table:
    """`columns` of the first row of each id in `ids`, in `ids`' order; a clear error when an id is not in the file
    (the shard changed after the stage that listed it)."""
    shard = pq.ParquetFile(file)
    in_file = shard.read(columns=[id_column]).column(id_column)
    position = pc.index_in(pa.array(ids, pa.string()), value_set=in_file)  # the first row of each id
    if position.null_count:
        missing = pc.filter(pa.array(ids, pa.string()), pc.is_null(position))[0].as_py()
        raise ValueError(f"{file}: {id_column} {missing!r} is not in this file any more; it changed after the "
                         f"prepare stage: run the job again (prepare sees the change)")
    position = position.to_numpy()
    starts = np.cumsum([0] + [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)])
    groups = np.unique(np.searchsorted(starts, position, side="right") - 1)
    local = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])  # file rows of the read
    table = shard.read_row_groups(groups.tolist(), columns=columns)
    return table.take(pa.array(np.searchsorted(local, position)))


def units_of(rows: pa.Table, id_column: str, size: int) -> pa.Table:
    """`rows` (with `file` and `id_column`) as units of work: (file, ids), at most `size` ids of one shard each."""
    files, ids = [], []
    by_file = rows.select(["file", id_column]).group_by("file", use_threads=False).aggregate([(id_column, "list")])
    for file, wanted in zip(by_file.column("file").to_pylist(), by_file.column(f"{id_column}_list").to_pylist()):
        for start in range(0, len(wanted), size):
            files.append(file)
            ids.append(wanted[start:start + size])
    return pa.table({"file": pa.array(files, pa.string()), "ids": pa.array(ids, pa.list_(pa.string()))})


def read_units(units: pa.Table, id_column: str, columns: list[str]) -> pa.Table:
    """The rows that (file, ids) units name, in their order (see `rows_by_id`)."""
    return pa.concat_tables(rows_by_id(file, id_column, ids, columns) for file, ids in
                            zip(units.column("file").to_pylist(), units.column("ids").to_pylist()))
