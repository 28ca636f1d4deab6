"""What was rejected, where and why: the rows of every file in `rejects/`, summarised for `newsclip rejects`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from newsclip.runtime.layout import Layout
from newsclip.runtime.store import parquet_files, write_stream

if TYPE_CHECKING:  # polars stays out of the encode stage's imports, which its workers share
    import polars as pl

COLUMNS = ("id", "kind", "stage", "reason")


def write_rejects(out: Path, name: str, stage: str, rows: pa.Table | pl.DataFrame | Iterable[pa.Table]) -> Path:
    """Commit `rejects/<name>.parquet`: `rows` (id, kind, reason, and any detail such as the input file; or tables
    of them, at least one, written as they come), each marked with the stage that rejected it."""
    tables = [rows] if isinstance(rows, pa.Table) else [rows.to_arrow()] if hasattr(rows, "to_arrow") else rows

    def staged() -> Iterator[pa.Table]:
        for table in tables:
            missing = [c for c in ("id", "kind", "reason") if c not in table.column_names]
            if missing:
                raise ValueError(f"rejects of {stage}: no {missing} column")
            yield table.append_column("stage", pa.array([stage] * len(table), pa.string()))

    path = Layout(out).rejects_file(name)
    write_stream(staged(), path)
    return path


def read_rejects(out: Path) -> pl.DataFrame:
    """Every rejected row (id, kind, stage, reason) of a job's output; empty when nothing was rejected."""
    import polars as pl

    try:
        files = parquet_files(Layout(out).rejects, "rejects")
    except FileNotFoundError:
        return pl.DataFrame(schema=dict.fromkeys(COLUMNS, pl.String))
    frames = []
    for path in files:
        frame = pl.read_parquet(path)
        frames.append(frame.select([pl.col(c).cast(pl.String) if c in frame.columns
                                    else pl.lit(None, pl.String).alias(c) for c in COLUMNS]))
    return pl.concat(frames)


def rejects_summary(out: Path, examples: int = 3) -> pl.DataFrame:
    """Rejected rows per stage, kind and reason, most frequent first, with a few example ids each."""
    import polars as pl

    # reasons carry details (a decoder's message); the part before the first colon is the kind of failure
    frame = read_rejects(out).with_columns(pl.col("reason").str.split(":").list.first())
    return (frame.group_by("stage", "kind", "reason", maintain_order=True)
            .agg(pl.len().alias("rows"), pl.col("id").head(examples).str.join(", ").alias("examples"))
            .sort(["stage", "rows"], descending=[False, True]))
