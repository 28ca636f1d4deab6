"""The job's translate stage: every non-English query text to English with Argos, as a Ray Data actor pool.

`translated/` holds the query rows in article id order, in parts of at most `translate.part_rows` rows. A run
translates only the texts that the last run's translator has not (by content hash), and the driver never holds the
archive's texts: the Ray Data pool reads them from `prepared/queries/` itself, and the last run's rows and the new
translations stream into one file per part (an id range), each then sorted on its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.articles import join_text
from newsclip.runtime.console import log
from newsclip.runtime.external_sort import ExternalSort
from newsclip.runtime.layout import Layout
from newsclip.runtime.rejects import write_rejects
from newsclip.runtime.stage import ActorRequest, Needs, Stage
from newsclip.runtime.store import parquet_files, read_batches, read_manifest, record_stage, staged_dir, write_table
from newsclip.translate.packages import require_packages, translator_key
from newsclip.translate.translator import NO_PACKAGE, OUTPUT_COLUMNS
from newsclip.translate.units import translate_rows

__all__ = ["run"]  # the stage; everything else here is its own business

# a translated row (then its joined query_text): the Translator's columns and the query's image, source and hash
ROW = {c: {"lang_confidence": pl.Float32, "translated": pl.Boolean, "truncated": pl.Boolean}.get(c, pl.String)
       for c in (*OUTPUT_COLUMNS, "image_id", "source", "article_hash")}


def _reusable(out: Path, key: str, hashes: pl.Series) -> tuple[list[Path], pl.DataFrame]:
    """The last run's translated/ files and, per content hash in `hashes` that they hold, the position of its first
    row in them; none when another translator made them."""
    none = [], pl.DataFrame(schema={"position": pl.UInt32, "article_hash": pl.String})
    entry = read_manifest(out).get("stages", {}).get("translate", {})
    folder = Layout(out).translated
    if entry.get("translator_key") != key or not folder.is_dir():
        return none
    files = parquet_files(folder, "translated")
    if "article_hash" not in pq.read_schema(files[0]).names:
        return none
    known = pl.read_parquet(files, columns=["article_hash"]).with_row_index("position")
    return files, known.unique("article_hash", keep="first").filter(pl.col("article_hash").is_in(hashes.implode()))


def _reused_rows(files: list[Path], known: pl.DataFrame, ids: pl.DataFrame) -> Iterator[pl.DataFrame]:
    """The last run's rows at `known` positions, read forward, as the rows of this run's ids with the same hash."""
    columns = [c for c in ROW if c not in ("article_id", "image_id", "source")]
    positions, start = np.sort(known["position"].to_numpy()), 0
    for file in files:
        for batch in read_batches(file, columns=columns):
            wanted = positions[np.searchsorted(positions, start):np.searchsorted(positions, start + len(batch))] - start
            start += len(batch)
            if len(wanted):
                yield pl.from_arrow(batch.take(wanted)).join(ids, on="article_hash", how="inner")


def _typed(rows: pl.DataFrame) -> pa.Table:
    """`rows` with ROW's types: a batch whose notes are all empty has a null-typed column, and every part gets one."""
    return rows.select(pl.col(c).cast(dtype) for c, dtype in ROW.items()).to_arrow()


def _run(cfg) -> dict | None:
    if not cfg.translate.enabled:
        return None
    out, layout, t = cfg.output, cfg.layout, cfg.translate.resolved()
    files = parquet_files(layout.prepared.queries, "prepared queries")
    queries = pl.concat([pl.read_parquet(f, columns=["article_id", "image_id", "source", "article_hash", "lang"])
                         .with_columns(file=pl.lit(str(f))) for f in files])
    if t.on_missing_package == "error":  # fail at job start, not in the middle of the stage
        given = queries.filter(pl.col("lang").is_not_null()).with_columns(pl.col("lang").str.to_lowercase())
        require_packages(dict(given.group_by("lang").len().iter_rows()), t.packages_dir, t.target)

    key = translator_key(t)
    ids = queries.drop("lang", "file")
    last_files, known = _reusable(out, key, ids["article_hash"])
    reused = pl.col("article_hash").is_in(known["article_hash"].implode())
    todo = queries.filter(~reused).drop("lang")
    facts = Counter()
    rejected, by_lang, splitters = [], Counter(), set()
    with staged_dir(out, layout.relative(layout.translated)) as stage:
        # an external sort by article id: one part in memory at a time; its files are gone before the commit
        parts = ExternalSort(stage / ".parts", "article_id", ids["article_id"], t.part_rows)
        for rows in _reused_rows(last_files, known, ids.filter(reused)):
            parts.add(_typed(rows))
        if len(todo):
            log(f"translate: {len(todo)} new texts, {len(queries) - len(todo)} reused from the last run")
            for rows in translate_rows(cfg, t, todo):
                parts.add(_typed(rows.join(todo.drop("file"), on="article_id", how="left")))
        skipped = pl.col("translate_note").str.ends_with(NO_PACKAGE).fill_null(False)
        for index, frame in enumerate(map(pl.from_arrow, parts.ranges())):
            kept = frame.filter(~skipped).with_columns(
                join_text(cfg.prepare.text, "title_en", "text_en").alias("query_text"))
            write_table(kept.to_arrow(), stage / f"part-{index:05d}.parquet")
            rejected.append(frame.filter(skipped).select(
                id=pl.col("article_id"), kind=pl.lit("article"), reason=pl.col("translate_note")))
            facts.update(rows=len(kept), truncated=int(kept["truncated"].sum()))
            by_lang.update(dict(kept.filter("translated").group_by("lang").len().iter_rows()))
            splitters.update(kept["splitter"].drop_nulls())
    rejected = pl.concat(rejected)
    rejects = write_rejects(out, "translate", "translate", rejected)
    return record_stage(out, "translate", parquet_files(layout.translated), rejects=str(rejects.relative_to(out)),
                        rows=facts["rows"],
                        translated=dict(sorted(by_lang.items())), truncated=facts["truncated"],
                        skipped=len(rejected), splitters=sorted(splitters), packages_dir=t.packages_dir,
                        translator_key=key, new=len(todo), reused=len(queries) - len(todo))


def _translator(cfg) -> str | None:
    """The installed packages and the settings that change a translation: another translator reruns the stage."""
    return translator_key(cfg.translate.resolved()) if cfg.translate.enabled else None


def _needs(cfg) -> Needs:
    """The translator actors' CPUs and GPUs."""
    if not cfg.translate.enabled:
        return Needs()
    t = cfg.translate
    return Needs(actors=(ActorRequest("translate", t.num_cpus_per_actor, t.num_gpus_per_actor,
                                      "translate.num_cpus_per_actor", "translate.num_gpus_per_actor"),))


run = Stage("translate", _run, external_inputs=_translator,
            sections=("input", "prepare", "eval", "encode", "translate"), needs=_needs,
            enabled=lambda cfg: cfg.translate.enabled)
