"""Encoding on the driver: the two sides (texts, images), the rows a run needs embedded, and encoding them with the
workers' code (`newsclip.workers.encoders`) on a Ray Data actor pool, or in this process when they are few.

The encode stage runs it per backbone and side; benchmarks time it. Driver code (pyarrow, Ray): no polars."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from newsclip.config import EncodeConfig, JobConfig
from newsclip.retrieval.backbones import input_sizes
from newsclip.runtime.console import log, progress
from newsclip.runtime.embedding_store import EmbeddingStore, content_keys
from newsclip.runtime.ray_setup import dataset_of, ensure_ray, map_actors
from newsclip.runtime.store import parquet_files, read_batches
from newsclip.workers.encoders import (
    TASK_ROWS,
    ImageEncoder,
    TextEncoder,
    read_and_decode_images,
    read_and_tokenize_texts,
)
from newsclip.workers.shard_rows import units_of

# batches queued on each model actor, their inputs already local: the next batch is there when one ends (Ray's
# default, 2, keeps one waiting; a slow decode task or a large batch then leaves a GPU idle)
BATCHES_IN_FLIGHT = 4


@dataclass(frozen=True)
class Side:
    """One side of the retrieval: its encoder and the id column of its rows."""

    name: str  # "texts" | "images"
    encoder: type  # the model actor: ImageEncoder | TextEncoder
    id_column: str
    kind: str  # what a rejected row is, in rejects/


TEXTS = Side("texts", TextEncoder, "article_id", "article")
IMAGES = Side("images", ImageEncoder, "image_id", "image")


def wanted_rows(cfg: JobConfig, side: Side, stored: pa.Array | None = None) -> tuple[pa.Table, pa.Table]:
    """(id, hash) of every row this run needs embedded, and the rows among them to encode: one per hash not in
    `stored`, with the `file` that holds it (the CPU tasks read texts and images from there). The texts are read
    batch by batch to hash them, so the driver holds the archive's ids and hashes, never its texts."""
    stored = pa.array([], pa.string()) if stored is None else stored
    wanted, todo = [], []
    for batch in _side_rows(cfg, side):
        wanted.append(batch.select([side.id_column, "hash"]))
        todo.append(batch.filter(pc.invert(pc.is_in(batch.column("hash"), value_set=stored))))
    wanted, todo = pa.concat_tables(wanted), pa.concat_tables(todo)
    _, first = np.unique(todo.column("hash").to_numpy(zero_copy_only=False), return_index=True)
    return wanted, todo.take(pa.array(np.sort(first), pa.int64()))


def _side_rows(cfg: JobConfig, side: Side) -> Iterator[pa.Table]:
    """The rows a side needs, in batches: (article_id | image_id, file, hash)."""
    if side is TEXTS:
        for path in parquet_files(cfg.query_texts, "query texts"):
            for batch in read_batches(path, columns=["article_id", "query_text"]):
                yield pa.table({"article_id": batch.column("article_id").cast(pa.string()),
                                "file": pa.array([str(path)] * len(batch), pa.string()),
                                "hash": content_keys(batch.column("query_text").to_pylist())})
        return
    images = pq.read_table(cfg.layout.prepared.candidates,
                           columns=["image_id", "file", "image_hash", "candidate"])
    images = images.filter(pc.field("candidate"))
    if cfg.eval.candidates == "sample":
        # the images of the queries that reach evaluation: a sampled article that translate left out takes its
        # image out of the pool with it, as if it had not been sampled
        queries = pq.read_table(parquet_files(cfg.query_texts, "query texts"), columns=["image_id"])
        images = images.filter(pc.is_in(images.column("image_id"), value_set=queries.column("image_id").unique()))
    yield images.select(["image_id", "file"]).append_column("hash", images.column("image_hash"))


def prepared_rows(side: Side, todo: pa.Table, backbone: str, enc: EncodeConfig, max_retries: int):
    """Ray Data rows ready for the model actors, made by CPU tasks, each reading its texts or images from their
    shard: (hash, tokens) for texts; for images (hash, uint8 pixels or JPEG bytes, error).

    A task takes TASK_ROWS rows, or `commit_rows` if fewer: an actor hands back a task's rows together, so this also
    sets how often the store can commit. The tasks' own retry bound (`max_retries`, which actors do not take) also
    keeps Ray from fusing them into the model actors, where they would decode on the GPU worker again."""
    units = units_of(todo, side.id_column, min(TASK_ROWS, enc.commit_rows))
    fn, kwargs = _preparation(side, backbone, enc)
    # map_batches would warn that max_retries (a remote arg) is deprecated: see map_actors
    return dataset_of(units, len(units)).map_batches_internal(
        fn, fn_kwargs=kwargs, batch_format="pyarrow", num_cpus=1, max_retries=max_retries)


def _preparation(side: Side, backbone: str, enc: EncodeConfig) -> tuple:
    """The CPU tasks' function and its arguments: tokenise texts, or read and decode images."""
    resolution, context_length = input_sizes(backbone, enc.download_root)
    if side is TEXTS:
        return read_and_tokenize_texts, {"context_length": context_length}
    return read_and_decode_images, {"resolution": resolution, "max_pixels": enc.max_image_pixels,
                                    "draft": enc.jpeg_draft, "jpeg_to_actor": enc.decode == "gpu", "alpha": enc.alpha}


def encode_here(enc: EncodeConfig, backbone: str, side: Side, todo: pa.Table) -> pa.Table:
    """`todo`'s (hash, embedding, error) rows computed in this process by the pool's own code: the CPU tasks'
    function on all of it, then the model actor's class, whose fixed batch shape gives each row the embedding an
    actor would give it. For a small night, where starting a pool and loading its model is most of the cost."""
    import torch

    fn, kwargs = _preparation(side, backbone, enc)
    ready = fn(units_of(todo, side.id_column, len(todo)), **kwargs)
    threads = torch.get_num_threads()  # the encoder sets the actors' thread count (same count, same bits)
    try:
        return side.encoder(backbone, enc)(ready)
    finally:
        torch.set_num_threads(threads)


def model_rows(cfg: JobConfig, enc: EncodeConfig, backbone: str, side: Side, todo: pa.Table):
    """The Ray dataset of `todo`'s (hash, embedding, error) rows: CPU tasks, then the model actor pool."""
    import ray

    ensure_ray(cfg.ray)
    return map_actors(  # bounded restarts and retries
        prepared_rows(side, todo, backbone, enc, cfg.ray.max_task_retries), cfg.ray,
        side.encoder,
        fn_constructor_kwargs={"backbone": backbone, "cfg": enc},
        batch_size=enc.batch_size,
        batch_format="pyarrow",
        # one actor at least, so that backbones side by side on a cluster never starve one another of GPUs
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=enc.actors,
                                           max_tasks_in_flight_per_actor=BATCHES_IN_FLIGHT),
        num_cpus=enc.num_cpus_per_actor,
        num_gpus=enc.num_gpus_per_actor,
    )


def encode_new(cfg: JobConfig, enc: EncodeConfig, backbone: str, side: Side, todo: pa.Table,
               store: EmbeddingStore) -> dict:
    """Encode `todo` on a Ray Data actor pool, committing to the store every `encode.commit_rows` rows.

    Returns the rows encoded, and the seconds to the first encoded batch (start-up: actors, models, first inputs)
    and its rows. At most `ray.inline_rows` rows for CPU actors are encoded in this process instead (`encode_here`).
    """
    started = time.perf_counter()
    if len(todo) <= cfg.ray.inline_rows and not enc.num_gpus_per_actor:
        log(f"encode {backbone} {side.name}: {len(todo)} new rows, encoded in this process (ray.inline_rows)")
        return {"encoded": _commit(store, [encode_here(enc, backbone, side, todo)]), "in_process": True,
                "first_batch_seconds": round(time.perf_counter() - started, 2), "first_batch_rows": len(todo)}
    ds = model_rows(cfg, enc, backbone, side, todo)
    pending, done, first = [], 0, {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        first = first or {"first_batch_seconds": round(time.perf_counter() - started, 2),
                          "first_batch_rows": len(batch)}
        pending.append(batch)
        progress(done + sum(map(len, pending)), len(todo), part=f"{backbone} {side.name}")
        if sum(map(len, pending)) >= enc.commit_rows:
            done += _commit(store, pending)
            log(f"encode {backbone} {side.name}: {done}/{len(todo)} new rows stored")
    return {"encoded": done + _commit(store, pending), **first}


def _commit(store: EmbeddingStore, pending: list[pa.Table]) -> int:
    if not pending:
        return 0
    table = pa.concat_tables(pending)
    pending.clear()
    store.append(table)
    return len(table)


# What newsclip's own code makes of the same bytes and weights, so that a store filled by an older version is not
# read as this one's: v2 loads weights bit for bit (they were rounded through fp16) and decodes transparent, palette,
# 1-bit, CMYK and 16-bit images exactly as clip's preprocess does (issue 23). Raise it when the pixels or the loaded
# weights change again.
ENCODER_VERSION = "v2"


def store_label(enc: EncodeConfig) -> str:
    """What besides the weights decides an embedding: the precision the actors run in (they check it), any
    preprocess other than clip's own, and ENCODER_VERSION. Embeddings that differ there never share a store folder."""
    variants = ((["nvjpeg"] if enc.decode == "gpu" else []) + (["draft"] if enc.jpeg_draft else [])
                + (["white"] if enc.alpha == "white" else []))
    return "-".join([enc.precision, *variants, ENCODER_VERSION])
