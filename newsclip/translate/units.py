"""Translating units of work (a Parquet file and the article ids of it to translate) with the Translator: in this
process when they are few, else on a Ray Data actor pool. The translate stage and fine-tuning's texts use it."""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.runtime.console import log, track
from newsclip.runtime.ray_setup import dataset_of, ensure_ray, map_actors
from newsclip.translate.translator import QueryTranslator, TranslateConfig
from newsclip.workers.shard_rows import units_of

BATCH = 256  # texts per Translator call
UNIT_ROWS = 2048  # texts per unit of work (one actor call) at most


def unit_size(rows: int, t: TranslateConfig) -> int:
    """Texts per unit of work for `rows` texts to translate: so that every actor of the pool gets work."""
    return min(UNIT_ROWS, max(BATCH, -(-rows // (4 * t.actors))))


def translate_rows(cfg, t: TranslateConfig, todo: pl.DataFrame, what: str = "translate") -> Iterator[pl.DataFrame]:
    """The Translator's rows for the `todo` rows (article_id, file: a file of article_id, title, body, lang rows), as
    they come (see `translate_units`)."""
    units = units_of(todo.select("article_id", "file").to_arrow(), "article_id", unit_size(len(todo), t))
    yield from translate_units(cfg, t, [units], len(todo), what)


def translate_units(cfg, t: TranslateConfig, units: list, rows: int, what: str = "translate",
                    translator: type = QueryTranslator) -> Iterator[pl.DataFrame]:
    """`translator`'s rows for units of work (file, ids; tables, or Parquet files of them) that name `rows` texts,
    as they come: in this process when they are few (`ray.inline_rows`) and the pool would run on CPUs, else on a
    Ray Data actor pool. Either way the translator reads the texts itself, in batches of the same size."""
    if rows <= cfg.ray.inline_rows and not t.num_gpus_per_actor:
        log(f"{what}: {rows} texts, translated in this process (ray.inline_rows)")
        call = translator(t, "cpu", BATCH)
        for table in units:
            yield pl.from_arrow(call(table if isinstance(table, pa.Table) else pq.read_table(table)))
        return
    import ray

    ensure_ray(cfg.ray)
    if all(isinstance(table, pa.Table) for table in units):
        table = pa.concat_tables(units)
        ds = dataset_of(table, len(table))
    else:
        ds = ray.data.read_parquet([str(f) for f in units]).repartition(target_num_rows_per_block=1)
    ds = map_actors(ds, cfg.ray, translator,  # bounded retries
                    fn_constructor_kwargs={"cfg": t, "device": "cuda" if t.num_gpus_per_actor else "cpu",
                                           "batch_size": BATCH},
                    batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=t.actors),
                    num_cpus=t.num_cpus_per_actor, num_gpus=t.num_gpus_per_actor)
    for batch in track(ds.iter_batches(batch_size=None, batch_format="pyarrow"), rows, unit="texts"):
        yield pl.from_arrow(batch)
