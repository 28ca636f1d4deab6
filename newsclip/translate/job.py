"""The job's translate stage: every non-English query text to English with Argos, as a Ray Data actor pool."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import polars as pl

from newsclip.pipeline import actor_retries
from newsclip.prepare import join_text
from newsclip.store import parquet_files, record_stage, staged_dir, write_table
from newsclip.translate.packages import require_packages
from newsclip.translate.stage import NO_PACKAGE, Translator


def texts_source(cfg) -> Path:
    """Where the encode and evaluate stages read the query texts (`query_text`, in English when translated)."""
    return cfg.output / ("translated" if cfg.translate.enabled else "prepared/queries")


def run(cfg) -> dict | None:
    import ray

    if not cfg.translate.enabled:
        return None
    started = time.time()
    out, t = cfg.output, cfg.translate.resolved()
    files = [str(p) for p in parquet_files(out / "prepared" / "queries", "prepared queries")]
    queries = pl.read_parquet(files, columns=["article_id", "lang", "image_id", "source"])
    if t.on_missing_package == "error":  # fail at job start, not in the middle of the stage
        given = queries.filter(pl.col("lang").is_not_null()).with_columns(pl.col("lang").str.to_lowercase())
        require_packages(dict(given.group_by("lang").len().iter_rows()), t.packages_dir, t.target)

    ds = (ray.data.read_parquet(files).select_columns(["article_id", "title", "body", "lang"])
          .rename_columns({"body": "text"}))
    ds = ds.map_batches(Translator, fn_constructor_kwargs={"cfg": t, "device": "cuda" if t.num_gpus_per_actor else "cpu"},
                        batch_size=256, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=t.actors),
                        num_cpus=t.num_cpus_per_actor, num_gpus=t.num_gpus_per_actor, ray_remote_args_fn=partial(actor_retries, cfg.ray))
    with staged_dir(out, "translated") as stage:
        ds.write_parquet(str(stage / "_raw"))
        raw = sorted((stage / "_raw").glob("*.parquet"))
        # a shard whose notes are all empty has a null-typed column: relax to the common types
        frame = pl.concat([pl.read_parquet(p) for p in raw], how="vertical_relaxed")
        frame = frame.with_columns(pl.col("translate_note", "splitter", "title_en", "text_en").cast(pl.String))
        frame = frame.join(queries.drop("lang"), on="article_id", how="left")
        for path in raw:
            path.unlink()
        (stage / "_raw").rmdir()
        skipped = pl.col("translate_note").str.ends_with(NO_PACKAGE).fill_null(False)
        kept = frame.filter(~skipped).with_columns(join_text(cfg.prepare.text, "title_en", "text_en").alias("query_text"))
        write_table(kept.to_arrow(), stage / "part-00000.parquet")
    rejected = frame.filter(skipped).select(pl.col("article_id").alias("id"), pl.lit("article").alias("kind"),
                                            pl.col("translate_note").alias("reason"), pl.lit("translate").alias("stage"))
    write_table(rejected.to_arrow(), out / "rejects" / "translate.parquet")
    by_lang = kept.filter("translated").group_by("lang").len().sort("lang")
    splitters = sorted(set(kept["splitter"].drop_nulls()))
    return record_stage(out, "translate", parquet_files(out / "translated"), rows=len(kept),
                        translated=dict(by_lang.iter_rows()), truncated=int(kept["truncated"].sum()),
                        skipped=len(rejected), splitters=splitters, packages_dir=t.packages_dir,
                        seconds=round(time.time() - started, 2))
