"""Prepare stage: join articles to images, reject what cannot be matched, sample the evaluation set."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from newsclip.config import JobConfig
from newsclip.store import parquet_files, record_stage, staged_dir, write_table

ARTICLE_COLUMNS = {"article_id": pl.String, "title": pl.String, "text": pl.String, "image_id": pl.String,
                   "source": pl.String, "lang": pl.String}
REQUIRED = {"articles": "article_id", "images": "image_id"}


class SchemaError(ValueError):
    """An input shard without a required column, or with a column of the wrong type."""


def _read_articles(spec: str) -> pl.DataFrame:
    frames = []
    for path in parquet_files(spec, "input.articles"):
        schema = pq.read_schema(path)
        if "article_id" not in schema.names:
            raise SchemaError(f"{path}: no 'article_id' column (has {', '.join(schema.names)}); "
                              "articles need article_id, and title/text/image_id/source/lang when known")
        frame = pl.read_parquet(path, columns=[c for c in ARTICLE_COLUMNS if c in schema.names])
        for column, dtype in ARTICLE_COLUMNS.items():
            if column not in frame.columns:
                frame = frame.with_columns(pl.lit(None, dtype).alias(column))
            elif frame.schema[column] != dtype:
                try:
                    frame = frame.with_columns(pl.col(column).cast(dtype, strict=True))
                except pl.exceptions.PolarsError:
                    raise SchemaError(f"{path}: column {column!r} is {frame.schema[column]}, expected a string") from None
        frames.append(frame.select(list(ARTICLE_COLUMNS)).with_columns(pl.lit(str(path)).alias("file")))
    return pl.concat(frames)


def _read_image_ids(spec: str) -> pl.DataFrame:
    """Image ids and the shard each lives in; the image bytes stay on disk for the encode stage."""
    frames = []
    for path in parquet_files(spec, "input.images"):
        schema = pq.read_schema(path)
        missing = [c for c in ("image_id", "image") if c not in schema.names]
        if missing:
            raise SchemaError(f"{path}: no {missing[0]!r} column (has {', '.join(schema.names)}); "
                              "images need image_id (string) and image (binary: the encoded file)")
        frame = pl.read_parquet(path, columns=["image_id"]).with_columns(pl.col("image_id").cast(pl.String))
        frames.append(frame.with_columns(pl.lit(str(path)).alias("file")))
    return pl.concat(frames)


def _reject(frame: pl.DataFrame, id_column: str, kind: str, reason: str) -> pl.DataFrame:
    return frame.select(pl.col(id_column).cast(pl.String).alias("id"), pl.lit(kind).alias("kind"),
                        pl.lit(reason).alias("reason"), pl.col("file"))


def join_text(mode: str, title: str = "title", body: str = "text") -> pl.Expr:
    """The text the encoder reads: title and body joined with a space (the paper), or one of them."""
    title, body = pl.col(title).str.strip_chars(), pl.col(body).str.strip_chars()
    parts = {"title": [title], "body": [body], "title_body": [title, body]}[mode]
    return pl.concat_str(parts, separator=" ", ignore_nulls=True).str.strip_chars()


def select(articles: pl.DataFrame, images: pl.DataFrame, text_mode: str) -> tuple[pl.DataFrame, pl.DataFrame,
                                                                                   pl.DataFrame]:
    """Split input rows into usable articles, usable images, and rejects with a reason each."""
    rejects = []
    dup_articles = articles.filter(pl.col("article_id").is_duplicated() & ~pl.col("article_id").is_first_distinct())
    rejects.append(_reject(dup_articles, "article_id", "article", "duplicate article_id (an earlier row was kept)"))
    articles = articles.filter(pl.col("article_id").is_first_distinct() & pl.col("article_id").is_not_null())

    dup_images = images.filter(~pl.col("image_id").is_first_distinct())
    rejects.append(_reject(dup_images, "image_id", "image", "duplicate image_id (an earlier row was kept)"))
    images = images.filter(pl.col("image_id").is_first_distinct() & pl.col("image_id").is_not_null())

    articles = articles.with_columns(join_text(text_mode).alias("query_text"),
                                     pl.col("source").fill_null("unknown"))
    no_text = pl.col("query_text").is_null() | (pl.col("query_text") == "")
    no_image_id = pl.col("image_id").is_null() | (pl.col("image_id") == "")
    known = pl.col("image_id").is_in(images["image_id"].implode())
    rejects.append(_reject(articles.filter(no_text), "article_id", "article", f"no text ({text_mode} is empty)"))
    rejects.append(_reject(articles.filter(~no_text & no_image_id), "article_id", "article", "no image_id"))
    rejects.append(_reject(articles.filter(~no_text & ~no_image_id & ~known), "article_id", "article",
                           "image_id not found in input.images"))
    usable = articles.filter(~no_text & ~no_image_id & known)
    return usable, images, pl.concat(rejects)


def sample_pairs(usable: pl.DataFrame, size: int | None, seed: int) -> pl.Series:
    """A seeded sample of article ids; order-independent (sorted first), so the same data gives the same sample."""
    ids = usable["article_id"].sort()
    if size is None or size >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return ids.gather(np.sort(rng.choice(len(ids), size=size, replace=False)))


def run(cfg: JobConfig) -> dict:
    started = time.time()
    out = cfg.output
    articles = _read_articles(cfg.input.articles)
    images = _read_image_ids(cfg.input.images)
    usable, images, rejects = select(articles, images, cfg.prepare.text)
    sampled = sample_pairs(usable, cfg.eval.sample_size, cfg.eval.seed)
    usable = usable.with_columns(pl.col("article_id").is_in(sampled.implode()).alias("in_eval"))
    queries = usable.filter("in_eval")
    if cfg.eval.candidates == "sample":
        candidate = pl.col("image_id").is_in(queries["image_id"].implode())
    else:
        candidate = pl.lit(True)
    images = images.with_columns(candidate.alias("candidate"))
    if len(queries) == 0:
        raise ValueError(f"prepare: no article has both text and a known image (of {len(articles)} articles, "
                         f"{len(images)} images); see {out / 'rejects' / 'prepare.parquet'}")

    note = None
    if cfg.eval.sample_size is not None and len(usable) < cfg.eval.sample_size:
        note = f"only {len(usable)} usable pairs, fewer than eval.sample_size={cfg.eval.sample_size}: all were used"
    with staged_dir(out, "prepared") as stage:
        write_table(usable.select("article_id", "image_id", "source", "lang", "in_eval", "file").to_arrow(),
                    stage / "articles.parquet")
        write_table(queries.select("article_id", "query_text", "title", pl.col("text").alias("body"), "lang",
                                   "image_id", "source").to_arrow(),
                    stage / "queries" / "part-00000.parquet")
        write_table(images.to_arrow(), stage / "candidates.parquet")
    write_table(rejects.with_columns(pl.lit("prepare").alias("stage")).to_arrow(), out / "rejects" / "prepare.parquet")
    facts = {"articles_in": len(articles), "images_in": len(images) + int((rejects["kind"] == "image").sum()),
             "usable_pairs": len(usable), "queries": len(queries), "candidates": int(images["candidate"].sum()),
             "rejected": len(rejects), "sample_note": note, "seconds": round(time.time() - started, 2)}
    return record_stage(out, "prepare", sorted((out / "prepared").rglob("*.parquet")), **facts)
