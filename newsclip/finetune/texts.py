"""The texts fine-tuning trains on: the job's own query texts, so in English where the job translates, made as the
translate stage makes them (the same Translator, settings and cache, title and body joined after translation)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl

from newsclip.articles import article_texts, join_text, shard_batches
from newsclip.config import JobConfig
from newsclip.runtime.store import parquet_files, write_tables

TEXTS = {"article_id": pl.String, "query_text": pl.String}


def training_texts(cfg: JobConfig, usable: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series]:
    """(article_id, query_text) of the `usable` articles (article_id, file: their input shard), and the ids of those
    that have no text the job would score: translation skipped for want of a package (the translate stage rejects
    them)."""
    if not cfg.translate.enabled:
        texts = article_texts(cfg.input.articles, cfg.prepare.text)
        return texts.filter(pl.col("article_id").is_in(usable["article_id"].implode())), pl.Series([], dtype=pl.String)
    from newsclip.translate.translator import NO_PACKAGE
    from newsclip.translate.units import translate_rows

    t = cfg.translate.resolved()
    staging = cfg.layout.staging
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="finetune-texts-", dir=staging) as folder:
        # the articles as the translator reads prepared/queries (title, body, lang), one file per input shard,
        # written a batch at a time: the driver never holds the archive's texts
        todo = []
        for index, path in enumerate(parquet_files(cfg.input.articles, "input.articles")):
            ids = usable.filter(pl.col("file") == str(path))["article_id"]
            if not len(ids):
                continue
            part = Path(folder) / f"part-{index:05d}.parquet"
            write_tables((frame.filter(pl.col("article_id").is_in(ids.implode()))
                          .select("article_id", "title", pl.col("text").alias("body"), "lang").to_arrow()
                          for frame in shard_batches(path)), part)
            todo.append(pl.DataFrame({"article_id": ids, "file": str(part)}))
        frames = [rows.select("article_id", pl.col("translate_note").cast(pl.String),  # null-typed when all null
                              join_text(cfg.prepare.text, "title_en", "text_en").alias("query_text"))
                  for rows in translate_rows(cfg, t, pl.concat(todo), "finetune: training texts")]
    rows = pl.concat(frames) if frames else pl.DataFrame(schema=TEXTS | {"translate_note": pl.String})
    skipped = pl.col("translate_note").str.ends_with(NO_PACKAGE).fill_null(False)
    return rows.filter(~skipped).select(*TEXTS), rows.filter(skipped)["article_id"]
