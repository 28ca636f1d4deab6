"""The job's translate stage: every non-English query text to English with Argos, as a Ray Data actor pool.

`translated/` holds the query rows in article id order, in parts of at most `translate.part_rows` rows. A run
translates only the texts that the last run's translator has not (by content hash), and the driver never holds the
archive's texts: the Ray Data pool reads them from `prepared/queries/` itself, and the last run's rows and the new
translations stream into one file per part (an id range), each then sorted on its own."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.articles import join_text
from newsclip.runtime import partitions  # its sizes by module: tests make them small
from newsclip.runtime.console import log
from newsclip.runtime.layout import Layout
from newsclip.runtime.partitions import (
    Spill,
    frames,
    gather,
    hash_partitions,
    quantile_bounds,
    range_partitions,
    run_parts,
)
from newsclip.runtime.rejects import write_rejects
from newsclip.runtime.stage import ActorRequest, Needs, Stage
from newsclip.runtime.store import parquet_files, read_batches, read_manifest, record_stage, staged_dir, write_table
from newsclip.translate.packages import require_packages, translator_key
from newsclip.translate.translator import NO_PACKAGE, OUTPUT_COLUMNS, QueryTranslator
from newsclip.translate.units import translate_units, unit_size
from newsclip.workers.shard_rows import read_units, units_of

__all__ = ["run"]  # the stage; everything else here is its own business

# a translated row (then its joined query_text): the Translator's columns and the query's image, source and hash
ROW = {c: {"lang_confidence": pl.Float32, "translated": pl.Boolean, "truncated": pl.Boolean}.get(c, pl.String)
       for c in (*OUTPUT_COLUMNS, "image_id", "source", "article_hash")}
KEYS = ("image_id", "source", "article_hash")  # the query columns a translated row carries beside the Translator's
QUERY_ROWS = {"article_id": pl.String, "image_id": pl.String, "source": pl.String, "article_hash": pl.String,
              "pos": pl.Int64}
# A row's place in a list of files: the file's index, then its row there (the order the rows are read in)
POS_BITS = 32
RANGE_PARTS = 4  # parts of translated/ in such a range, about: the driver holds one range's rows (with their texts)


def _scan_queries(file: str, index: int, work: str, parts: int) -> dict:
    """One prepared/queries part's rows (QUERY_ROWS) hash-partitioned by content hash into `work/by-hash/`; its
    rows, its languages' row counts (lower case) and a sample of its ids."""
    rows, langs, sample = 0, Counter(), []
    with Spill(Path(work) / "by-hash", f"{index:06d}") as spill:
        for batch in read_batches(Path(file), columns=["article_id", "image_id", "source", "article_hash", "lang"]):
            frame = pl.from_arrow(batch).with_columns(
                pos=pl.int_range(rows, rows + batch.num_rows, dtype=pl.Int64) + (index << POS_BITS))
            given = frame.filter(pl.col("lang").is_not_null()).with_columns(pl.col("lang").str.to_lowercase())
            langs.update(dict(given.group_by("lang").len().iter_rows()))
            spill.add(frame.select(*QUERY_ROWS).cast(QUERY_ROWS), hash_partitions(frame["article_hash"], parts))
            sample.append(frame["article_id"].gather_every(partitions.SAMPLE_EVERY))
            rows += batch.num_rows
    return {"rows": rows, "langs": dict(langs), "sample": pl.concat(sample).to_list() if sample else []}


def _scan_translated(file: str, index: int, work: str, parts: int) -> None:
    """The content hash of each row of one part of the last run's translated/, with its place, hash-partitioned
    into `work/last/`."""
    start = 0
    with Spill(Path(work) / "last", f"{index:06d}") as spill:
        for batch in read_batches(Path(file), columns=["article_hash"]):
            frame = pl.from_arrow(batch).with_columns(
                pos=pl.int_range(start, start + batch.num_rows, dtype=pl.Int64) + (index << POS_BITS))
            spill.add(frame, hash_partitions(frame["article_hash"], parts))
            start += batch.num_rows


def _reuse_part(part: int, work: str, reusable: bool) -> dict:
    """One hash partition: its queries whose content hash the last run translated (the first such row of it) go
    to `work/reused/<last part>/` with that row's place; the others to `work/todo/<queries part>/`. Their counts."""
    work = Path(work)
    queries = gather(work / "by-hash", part, QUERY_ROWS)
    last = gather(work / "last", part, {"article_hash": pl.String, "pos": pl.Int64}) if reusable else None
    if last is not None and len(last):
        known = last.unique("article_hash", keep="first").rename({"pos": "last_pos"})
        queries = queries.join(known, on="article_hash", how="left", maintain_order="left")
    else:
        queries = queries.with_columns(last_pos=pl.lit(None, pl.Int64))
    reused = queries.filter(pl.col("last_pos").is_not_null())
    todo = queries.filter(pl.col("last_pos").is_null()).drop("last_pos")
    with Spill(work / "reused", f"{part:05d}") as spill:
        spill.add(reused, (reused["last_pos"] // (1 << POS_BITS)).to_numpy())
    with Spill(work / "todo", f"{part:05d}") as spill:
        spill.add(todo, (todo["pos"] // (1 << POS_BITS)).to_numpy())
        todo_rows = spill.rows
    return {"reused": len(reused), "todo": todo_rows}


def _reused_rows(file: str, index: int, work: str, bounds: list[str]) -> int:
    """The rows of one part of the last run's translated/ that this run reuses, read forward, as the rows of this
    run's ids with the same content hash, range-partitioned by id into `work/rows/`; their count."""
    work = Path(work)
    wanted = gather(work / "reused", index, {**QUERY_ROWS, "last_pos": pl.Int64})
    wanted = wanted.with_columns(row=pl.col("last_pos") % (1 << POS_BITS)).drop("pos", "last_pos", "article_hash")
    positions, start, rows = np.unique(wanted["row"].to_numpy()), 0, 0
    columns = [c for c in ROW if c not in ("article_id", "image_id", "source")]
    bounds = pl.Series(bounds, dtype=pl.String)
    with Spill(work / "rows", f"last-{index:06d}") as spill:
        for batch in read_batches(Path(file), columns=columns):
            take = positions[np.searchsorted(positions, start):np.searchsorted(positions, start + len(batch))]
            if len(take):
                found = pl.from_arrow(batch.take(take - start)).with_columns(row=pl.Series(take, dtype=pl.Int64))
                found = _typed_frame(found.join(wanted, on="row", how="inner"))
                spill.add(found, range_partitions(found["article_id"], bounds))
                rows += len(found)
            start += len(batch)
    return rows


def _typed_frame(rows: pl.DataFrame) -> pl.DataFrame:
    """`rows` with ROW's types: a batch whose notes are all empty has a null-typed column, and every part gets one."""
    return rows.select(pl.col(c).cast(dtype) for c, dtype in ROW.items())


class _KeyedTranslator(QueryTranslator):
    """The Translator's rows of a unit with the query's image, source and content hash, read from the same shard."""

    def __call__(self, units: pa.Table) -> pa.Table:
        translated = super().__call__(units)
        keys = read_units(units, "article_id", list(KEYS))
        return translated.drop_columns([c for c in KEYS if c in translated.column_names]).append_column(
            KEYS[0], keys.column(KEYS[0])).append_column(KEYS[1], keys.column(KEYS[1])).append_column(
            KEYS[2], keys.column(KEYS[2]))


def _write_units(file: str, index: int, work: str, size: int) -> str | None:
    """The units of work (file, ids) of one queries part's texts to translate, in its order, as a Parquet file
    (None when it has none)."""
    rows = gather(Path(work) / "todo", index, QUERY_ROWS)
    if not len(rows):
        return None
    rows = rows.sort("pos").with_columns(file=pl.lit(file))
    target = Path(work) / "units" / f"{index:06d}.parquet"
    return str(write_table(units_of(rows.select("article_id", "file").to_arrow(), "article_id", size), target))


def _parts(ranges: Iterator[pl.DataFrame], part_rows: int) -> Iterator[pl.DataFrame]:
    """The rows of id ranges (in id order, each unsorted) as parts of `part_rows` rows in id order (the last part
    fewer): a range's last rows wait for the next range's first."""
    held = None
    for ranged in ranges:
        ranged = ranged.sort("article_id") if held is None else pl.concat([held, ranged.sort("article_id")])
        whole = len(ranged) // part_rows * part_rows
        for start in range(0, whole, part_rows):
            yield ranged.slice(start, part_rows)
        held = ranged.slice(whole)
    if held is not None and len(held):
        yield held


def _run(cfg) -> dict | None:
    if not cfg.translate.enabled:
        return None
    out, layout, t = cfg.output, cfg.layout, cfg.translate.resolved()
    work = layout.scratch("translate")
    try:
        return _translate(cfg, out, layout, t, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _translate(cfg, out: Path, layout: Layout, t, work: Path) -> dict:
    files = parquet_files(layout.prepared.queries, "prepared queries")
    total = sum(pq.read_metadata(f).num_rows for f in files)
    inline = total <= cfg.ray.inline_rows  # the same work in this process
    parts = max(1, -(-total // partitions.PART_ROWS))
    scanned = run_parts(cfg, _scan_queries, [(str(f), i, str(work), parts) for i, f in enumerate(files)], inline,
                        "query parts")
    if t.on_missing_package == "error":  # fail at job start, not in the middle of the stage
        langs = Counter()
        for s in scanned:
            langs.update(s["langs"])
        require_packages(dict(langs), t.packages_dir, t.target)
    bounds = quantile_bounds(pl.Series([i for s in scanned for i in s["sample"]], dtype=pl.String),
                             -(-total // (RANGE_PARTS * t.part_rows))).to_list()
    del scanned

    key = translator_key(t)
    last_files = _reusable(out, key)
    run_parts(cfg, _scan_translated, [(str(f), i, str(work), parts) for i, f in enumerate(last_files)], inline,
              "last parts")
    split = run_parts(cfg, _reuse_part, [(p, str(work), bool(last_files)) for p in range(parts)], inline,
                      "partitions")
    todo = sum(sum(s["todo"].values()) for s in split)
    run_parts(cfg, _reused_rows, [(str(f), i, str(work), bounds) for i, f in enumerate(last_files)], inline,
              "reused parts")
    if todo:
        log(f"translate: {todo} new texts, {total - todo} reused from the last run")
        units = run_parts(cfg, _write_units, [(str(f), i, str(work), unit_size(todo, t)) for i, f in enumerate(files)],
                          inline, "query parts")
        units = [Path(u) for u in units if u is not None]
        with Spill(work / "rows", "new") as spill:
            for rows in translate_units(cfg, t, units, todo, translator=_KeyedTranslator):
                rows = _typed_frame(rows)
                spill.add(rows, range_partitions(rows["article_id"], pl.Series(bounds, dtype=pl.String)))
    facts = Counter()
    rejected, by_lang, splitters = [], Counter(), set()
    skipped = pl.col("translate_note").str.ends_with(NO_PACKAGE).fill_null(False)
    with staged_dir(out, layout.relative(layout.translated)) as stage:
        for index, frame in enumerate(_parts(frames(work / "rows", range(len(bounds) + 1), ROW), t.part_rows)):
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
                        translator_key=key, new=todo, reused=total - todo)


def _reusable(out: Path, key: str) -> list[Path]:
    """The last run's translated/ files, if the same translator made them (and they carry content hashes)."""
    entry = read_manifest(out).get("stages", {}).get("translate", {})
    folder = Layout(out).translated
    if entry.get("translator_key") != key or not folder.is_dir():
        return []
    files = parquet_files(folder, "translated")
    return files if "article_hash" in pq.read_schema(files[0]).names else []


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
