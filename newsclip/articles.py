"""The input contract's schemas, and what an article's text is: its shards read, its text joined, its hash, the sample.

Prepare, translate, fine-tuning, ingest and the demo data all take them from here. polars is imported inside the
functions that use it, so that writing the demo data (pyarrow only) does not load it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.runtime.embedding_store import content_keys
from newsclip.runtime.store import parquet_files, read_batches

if TYPE_CHECKING:
    import polars as pl

# The input contract (docs/architecture.md): what `newsclip ingest` and the demo data write, and prepare reads.
ARTICLE_SCHEMA = pa.schema([
    ("article_id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("image_id", pa.string()),
    ("source", pa.string()), ("lang", pa.string()), ("published", pa.timestamp("s")),
])
IMAGE_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary())])
# the article columns the job reads: the string ones (not `published`), each null where a shard has none
ARTICLE_COLUMNS = tuple(field.name for field in ARTICLE_SCHEMA if field.type == pa.string())
ARTICLE_BATCH = 2048  # article rows read at a time: the driver never holds every title and body at once


class SchemaError(ValueError):
    """An input shard without a required column, or with a column of the wrong type."""


def shard_file(path: Path) -> pq.ParquetFile:
    """An input shard, opened (its footer read); SchemaError naming it when it is not a readable Parquet file."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:  # pyarrow's message names no file
        raise SchemaError(f"{path}: not a readable Parquet file ({e}); it may be truncated or still being copied: "
                          "write it again (copy it, or rerun `newsclip ingest`), or move it out of the input folder") \
            from None


def shard_batches(path: Path) -> Iterator[pl.DataFrame]:
    """One articles shard in batches of ARTICLE_COLUMNS (strings; null where the shard has none) and `row`, each
    row's position in the shard."""
    import polars as pl

    with shard_file(path) as shard:
        names = shard.schema_arrow.names
    if "article_id" not in names:
        raise SchemaError(f"{path}: no 'article_id' column (has {', '.join(names)}); "
                          "articles need article_id, and title/text/image_id/source/lang when known")
    row = 0
    for batch in read_batches(path, ARTICLE_BATCH, [c for c in ARTICLE_COLUMNS if c in names]):
        frame = pl.from_arrow(batch)
        for column in ARTICLE_COLUMNS:
            if column not in frame.columns:
                frame = frame.with_columns(pl.lit(None, pl.String).alias(column))
            elif frame.schema[column] != pl.String:
                try:
                    frame = frame.with_columns(pl.col(column).cast(pl.String, strict=True))
                except pl.exceptions.PolarsError:
                    raise SchemaError(f"{path}: column {column!r} is {frame.schema[column]}, expected a string") \
                        from None
        yield frame.select(*ARTICLE_COLUMNS, pl.int_range(row, row + len(frame), dtype=pl.Int64).alias("row"))
        row += len(frame)


def article_texts(spec: str, text_mode: str) -> pl.DataFrame:
    """The text the encoder reads (`query_text`) per article id, from the first row of each id."""
    import polars as pl

    frames = [frame.select("article_id", join_text(text_mode).alias("query_text"))
              for path in parquet_files(spec, "input.articles") for frame in shard_batches(path)]
    texts = pl.concat(frames) if frames else pl.DataFrame(schema={"article_id": pl.String, "query_text": pl.String})
    return texts.filter(pl.col("article_id").is_first_distinct())


def _text_parts(mode: str, title: str, body: str) -> list[pl.Expr]:
    import polars as pl

    return [pl.col(c) for c in {"title": [title], "body": [body], "title_body": [title, body]}[mode]]


def join_text(mode: str, title: str = "title", body: str = "text") -> pl.Expr:
    """The text the encoder reads: title and body joined with a space (the paper), or one of them."""
    import polars as pl

    parts = [part.str.strip_chars() for part in _text_parts(mode, title, body)]
    return pl.concat_str(parts, separator=" ", ignore_nulls=True).str.strip_chars()


def has_text(mode: str) -> pl.Expr:
    """Whether `join_text(mode)` is not empty, without building it: some part has a character that is not space."""
    import polars as pl

    return pl.any_horizontal(part.str.contains(r"\S").fill_null(False) for part in _text_parts(mode, "title", "text"))


def article_hashes(articles: pl.DataFrame) -> pl.Series:
    """What makes an article the same article: its title, text and language (the translate stage's cache key)."""
    import polars as pl

    return pl.Series("article_hash", content_keys(
        "\x1f".join("\x00" if v is None else v for v in row)
        for row in articles.select("title", "text", "lang").iter_rows()), pl.String)


def sample_pairs(usable: pl.DataFrame, size: int | None, seed: int) -> pl.Series:
    """A seeded sample of article ids; order-independent (sorted first), so the same data gives the same sample."""
    ids = usable["article_id"].sort()
    positions = sample_positions(len(ids), size, seed)
    return ids if positions is None else ids.gather(positions)


def sample_positions(count: int, size: int | None, seed: int) -> np.ndarray | None:
    """Which of `count` ids in sorted order `sample_pairs` takes, sorted; None when it takes them all."""
    if size is None or size >= count:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=size, replace=False))
