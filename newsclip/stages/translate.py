"""The job's translate stage: every non-English query text to English with Argos, as a Ray Data actor pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.runtime.console import log, track
from newsclip.runtime.embedding_store import content_key
from newsclip.runtime.ray_setup import dataset_of, ensure_ray, map_actors
from newsclip.runtime.rejects import write_rejects
from newsclip.runtime.store import parquet_files, read_manifest, record_stage, staged_dir, write_table
from newsclip.stages.prepare import join_text
from newsclip.translate.packages import installed_packages, require_packages
from newsclip.translate.translator import NO_PACKAGE, OUTPUT_COLUMNS, Translator

__all__ = ["run"]  # the stage; everything else here is its own business

BATCH = 256  # texts per Translator call


def translator_key(t) -> str:
    """What decides a translation besides the text: the installed packages and the settings that change output."""
    packages = [{k: v for k, v in meta.items() if k != "path"} for meta in installed_packages(t.packages_dir)]
    return content_key(json.dumps([packages, t.target, t.max_chars, t.on_missing_package], sort_keys=True))


def _previous(out: Path, key: str) -> pl.DataFrame | None:
    """Last run's translations by article content, when the same translator made them."""
    entry = read_manifest(out).get("stages", {}).get("translate", {})
    if entry.get("translator_key") != key or not (out / "translated").is_dir():
        return None
    files = parquet_files(out / "translated", "translated")
    if "article_hash" not in pq.read_schema(files[0]).names:
        return None
    columns = ["article_hash", *[c for c in OUTPUT_COLUMNS if c != "article_id"]]  # not the joined query_text
    return pl.read_parquet(files, columns=columns).unique("article_hash")


def _numpy(batch: pa.Table) -> dict[str, np.ndarray]:
    """A batch as Ray Data's "numpy" format hands it to the Translator."""
    return {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}


def _translate(cfg, t, queries: pl.DataFrame) -> pl.DataFrame:
    """Translate the query rows on a Ray Data actor pool, or in this process when they are few (`ray.inline_rows`)
    and the pool would run on CPUs: the same Translator on batches of the same size."""
    rows = queries.select("article_id", "title", pl.col("body").alias("text"), "lang").to_arrow()
    if len(rows) <= cfg.ray.inline_rows and not t.num_gpus_per_actor:
        log(f"translate: {len(rows)} texts, translated in this process (ray.inline_rows)")
        translator = Translator(cfg=t, device="cpu")
        batches = (rows.slice(start, BATCH) for start in range(0, len(rows), BATCH))
        frames = [pl.from_arrow(pa.table({k: pa.array(v) for k, v in translator(_numpy(batch)).items()}))
                  for batch in batches]
        return pl.concat(frames, how="vertical_relaxed").with_columns(
            pl.col("translate_note", "splitter", "title_en", "text_en").cast(pl.String))
    import ray

    ensure_ray(cfg.ray)
    ds = dataset_of(rows, 4 * t.actors)
    device = "cuda" if t.num_gpus_per_actor else "cpu"
    ds = map_actors(ds, cfg.ray, Translator, fn_constructor_kwargs={"cfg": t, "device": device},  # bounded retries
                    batch_size=BATCH, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=t.actors),
                    num_cpus=t.num_cpus_per_actor, num_gpus=t.num_gpus_per_actor)
    # a batch whose notes are all empty has a null-typed column: relax to the common types
    batches = track(ds.iter_batches(batch_size=None, batch_format="pyarrow"), len(queries), unit="texts")
    frame = pl.concat([pl.from_arrow(b) for b in batches], how="vertical_relaxed")
    return frame.with_columns(pl.col("translate_note", "splitter", "title_en", "text_en").cast(pl.String))


def run(cfg) -> dict | None:
    if not cfg.translate.enabled:
        return None
    out, t = cfg.output, cfg.translate.resolved()
    files = parquet_files(out / "prepared" / "queries", "prepared queries")
    queries = pl.read_parquet(files, columns=["article_id", "image_id", "source", "article_hash", "lang"])
    if t.on_missing_package == "error":  # fail at job start, not in the middle of the stage
        given = queries.filter(pl.col("lang").is_not_null()).with_columns(pl.col("lang").str.to_lowercase())
        require_packages(dict(given.group_by("lang").len().iter_rows()), t.packages_dir, t.target)

    key = translator_key(t)
    ids = queries.drop("lang")
    previous = _previous(out, key)
    reused = ids.join(previous, on="article_hash", how="inner") if previous is not None else None
    todo = ids if reused is None else ids.join(reused.select("article_id"), on="article_id", how="anti")
    parts = [] if reused is None else [reused]
    if len(todo):
        log(f"translate: {len(todo)} new texts, {len(queries) - len(todo)} reused from the last run")
        # the titles and bodies of the new texts only: a night does not read the archive's
        todo = pl.scan_parquet(files).filter(pl.col("article_id").is_in(todo["article_id"].implode())).collect()
        parts.append(_translate(cfg, t, todo).join(ids, on="article_id", how="left"))
    # in article id order: the same articles give the same file, however many were reused
    frame = pl.concat([p.select(parts[-1].columns) for p in parts], how="vertical_relaxed").sort("article_id")
    skipped = pl.col("translate_note").str.ends_with(NO_PACKAGE).fill_null(False)
    kept = frame.filter(~skipped).with_columns(join_text(cfg.prepare.text, "title_en", "text_en").alias("query_text"))
    with staged_dir(out, "translated") as stage:
        write_table(kept.to_arrow(), stage / "part-00000.parquet")
    rejected = frame.filter(skipped).select(pl.col("article_id").alias("id"), pl.lit("article").alias("kind"),
                                            pl.col("translate_note").alias("reason"))
    write_rejects(out, "translate", "translate", rejected)
    by_lang = kept.filter("translated").group_by("lang").len().sort("lang")
    splitters = sorted(set(kept["splitter"].drop_nulls()))
    return record_stage(out, "translate", parquet_files(out / "translated"), rows=len(kept),
                        translated=dict(by_lang.iter_rows()), truncated=int(kept["truncated"].sum()),
                        skipped=len(rejected), splitters=splitters, packages_dir=t.packages_dir,
                        translator_key=key, new=len(todo), reused=len(queries) - len(todo))
