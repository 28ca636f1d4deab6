"""Prepare stage: join articles to images, reject what cannot be matched, sample the evaluation set."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.config import JobConfig
from newsclip.embedding_store import hash_array
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


def _read_images(spec: str, previous: Path) -> pl.DataFrame:
    """Image ids, the shard each lives in and the hash of its bytes; the bytes stay on disk for the encode stage.

    Hashing reads every image, so a shard unchanged since the last committed prepare (same path, size and
    mtime) takes its hashes from `previous` instead: a nightly run reads only the new shards."""
    cached = pl.read_parquet(previous) if previous.exists() else None
    frames = []
    for path in parquet_files(spec, "input.images"):
        stat = path.stat()
        fingerprint = {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if cached is not None:
            hit = cached.filter(**fingerprint)
            if len(hit):
                frames.append(hit)
                continue
        schema = pq.read_schema(path)
        missing = [c for c in ("image_id", "image") if c not in schema.names]
        if missing:
            raise SchemaError(f"{path}: no {missing[0]!r} column (has {', '.join(schema.names)}); "
                              "images need image_id (string) and image (binary: the encoded file)")
        table = pq.read_table(path, columns=["image_id", "image"])
        frame = pl.DataFrame({"image_id": table.column("image_id").cast(pa.string()).to_pylist(),
                              "image_hash": hash_array(b or b"" for b in table.column("image").to_pylist())})
        frames.append(frame.with_columns(**{k: pl.lit(v) for k, v in fingerprint.items()}))
    return pl.concat(frames, how="vertical_relaxed")


def article_hashes(articles: pl.DataFrame) -> pl.Series:
    """What makes an article the same article: its title, text and language (the translate stage's cache key)."""
    return pl.Series("content_hash", hash_array(
        "\x1f".join("\x00" if v is None else v for v in row)
        for row in articles.select("title", "text", "lang").iter_rows()), pl.String)


def changes(previous: Path, current: pl.DataFrame, id_column: str, hash_column: str) -> dict:
    """Rows seen, new, changed and deleted since the last committed prepare (all new on a first run)."""
    current = current.unique(id_column, keep="first").select(id_column, hash_column)
    before = pl.read_parquet(previous, columns=[id_column, hash_column]).unique(id_column, keep="first") \
        if previous.exists() else current.clear()
    both = current.join(before, on=id_column, how="inner", suffix="_before")
    return {"seen": len(current), "new": len(current) - len(both),
            "changed": int((both[hash_column] != both[f"{hash_column}_before"]).sum()),
            "deleted": len(before) - len(both)}


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
    # rows without an id first: polars counts nulls as one value, so the first would pass as distinct (and then
    # vanish with no reject) and the others would be called duplicates
    rejects.append(_reject(articles.filter(pl.col("article_id").is_null()), "article_id", "article", "no article_id"))
    articles = articles.filter(pl.col("article_id").is_not_null())
    dup_articles = articles.filter(~pl.col("article_id").is_first_distinct())
    rejects.append(_reject(dup_articles, "article_id", "article", "duplicate article_id (an earlier row was kept)"))
    articles = articles.filter(pl.col("article_id").is_first_distinct())

    rejects.append(_reject(images.filter(pl.col("image_id").is_null()), "image_id", "image", "no image_id"))
    images = images.filter(pl.col("image_id").is_not_null())
    dup_images = images.filter(~pl.col("image_id").is_first_distinct())
    rejects.append(_reject(dup_images, "image_id", "image", "duplicate image_id (an earlier row was kept)"))
    images = images.filter(pl.col("image_id").is_first_distinct())

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
    articles = articles.with_columns(article_hashes(articles))
    image_rows = _read_images(cfg.input.images, out / "prepared" / "image_hashes.parquet")
    diff = {"articles": changes(out / "prepared" / "articles_all.parquet", articles, "article_id", "content_hash"),
            "images": changes(out / "prepared" / "image_hashes.parquet", image_rows, "image_id", "image_hash")}
    usable, images, rejects = select(articles, image_rows.select("image_id", "image_hash", "file"), cfg.prepare.text)
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
                                   "image_id", "source", "content_hash").to_arrow(),
                    stage / "queries" / "part-00000.parquet")
        write_table(images.to_arrow(), stage / "candidates.parquet")
        # what the next run compares against (and the image hashes it need not compute again)
        write_table(articles.select("article_id", "content_hash").to_arrow(), stage / "articles_all.parquet")
        write_table(image_rows.to_arrow(), stage / "image_hashes.parquet")
    write_table(rejects.with_columns(pl.lit("prepare").alias("stage")).to_arrow(), out / "rejects" / "prepare.parquet")
    facts = {"articles_in": len(articles), "images_in": len(images) + int((rejects["kind"] == "image").sum()),
             "usable_pairs": len(usable), "queries": len(queries), "candidates": int(images["candidate"].sum()),
             "rejected": len(rejects), "sample_note": note, "changes": diff, "seconds": round(time.time() - started, 2)}
    return record_stage(out, "prepare", sorted((out / "prepared").rglob("*.parquet")), **facts)
