"""What was rejected, where and why: the rows of every file in `rejects/`, summarised for `newsclip rejects`."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from newsclip.runtime.store import parquet_files

COLUMNS = {"id": pl.String, "kind": pl.String, "stage": pl.String, "reason": pl.String}


def read_rejects(out: Path) -> pl.DataFrame:
    """Every rejected row (id, kind, stage, reason) of a job's output; empty when nothing was rejected."""
    try:
        files = parquet_files(out / "rejects", "rejects")
    except FileNotFoundError:
        return pl.DataFrame(schema=COLUMNS)
    frames = []
    for path in files:
        frame = pl.read_parquet(path)
        frames.append(frame.select([pl.col(c).cast(t) if c in frame.columns else pl.lit(None, t).alias(c)
                                    for c, t in COLUMNS.items()]))
    return pl.concat(frames)


def rejects_summary(out: Path, examples: int = 3) -> pl.DataFrame:
    """Rejected rows per stage, kind and reason, most frequent first, with a few example ids each."""
    # reasons carry details (a decoder's message); the part before the first colon is the kind of failure
    frame = read_rejects(out).with_columns(pl.col("reason").str.split(":").list.first())
    return (frame.group_by("stage", "kind", "reason", maintain_order=True)
            .agg(pl.len().alias("rows"), pl.col("id").head(examples).str.join(", ").alias("examples"))
            .sort(["stage", "rows"], descending=[False, True]))
