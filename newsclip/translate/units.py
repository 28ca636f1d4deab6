"""Translating units of work (a Parquet file and the article ids of it to translate) with the Translator: in this
process when they are few, else on a Ray Data actor pool. The translate stage and fine-tuning's texts use it."""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl

from newsclip.runtime.console import log, track
from newsclip.runtime.ray_setup import dataset_of, ensure_ray, map_actors
from newsclip.translate.translator import QueryTranslator, TranslateConfig
from newsclip.workers.shard_rows import units_of

BATCH = 256  # texts per Translator call
UNIT_ROWS = 2048  # texts per unit of work (one actor call) at most


def translate_rows(cfg, t: TranslateConfig, todo: pl.DataFrame, what: str = "translate") -> Iterator[pl.DataFrame]:
    """The Translator's rows for the `todo` rows (article_id, file: a file of article_id, title, body, lang rows), as
    they come: in this process when they are few (`ray.inline_rows`) and the pool would run on CPUs, else on a Ray
    Data actor pool. Either way on units of work (file, ids) whose texts the translator reads itself, in batches of
    the same size."""
    size = min(UNIT_ROWS, max(BATCH, -(-len(todo) // (4 * t.actors))))  # so that every actor of the pool gets work
    units = units_of(todo.select("article_id", "file").to_arrow(), "article_id", size)
    if len(todo) <= cfg.ray.inline_rows and not t.num_gpus_per_actor:
        log(f"{what}: {len(todo)} texts, translated in this process (ray.inline_rows)")
        yield pl.from_arrow(QueryTranslator(t, "cpu", BATCH)(units))
        return
    import ray

    ensure_ray(cfg.ray)
    ds = map_actors(dataset_of(units, len(units)), cfg.ray, QueryTranslator,  # bounded retries
                    fn_constructor_kwargs={"cfg": t, "device": "cuda" if t.num_gpus_per_actor else "cpu",
                                           "batch_size": BATCH},
                    batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=t.actors),
                    num_cpus=t.num_cpus_per_actor, num_gpus=t.num_gpus_per_actor)
    for batch in track(ds.iter_batches(batch_size=None, batch_format="pyarrow"), len(todo), unit="texts"):
        yield pl.from_arrow(batch)
