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
from newsclip.retrieval.backbone_values import TRANSLATED, ResolvedBackbone
from newsclip.retrieval.registry import as_resolved
from newsclip.runtime.console import log, progress
from newsclip.runtime.embedding_store import EmbeddingStore, content_keys
from newsclip.runtime.ray_setup import dataset_of, ensure_ray, map_actors
from newsclip.runtime.store import parquet_files, read_batches
from newsclip.workers.encoders import (
    TASK_ROWS,
    ImageEncoder,
    TextEncoder,
    decode_images,
    read_and_decode_images,
    read_and_tokenize_texts,
    tokenize_texts,
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


def wanted_rows(cfg: JobConfig, side: Side, stored: pa.Array | None = None,
                text: str = TRANSLATED) -> tuple[pa.Table, pa.Table]:
    """(id, hash) of every row this run needs embedded, and the rows among them to encode: one per hash not in
    `stored`, with the `file` that holds it (the CPU tasks read texts and images from there). The texts are read
    batch by batch to hash them, so the driver holds the archive's ids and hashes, never its texts. `text`: the
    backbone's texts, translated (the job's query texts) or original (the prepared texts, before translation)."""
    stored = pa.array([], pa.string()) if stored is None else stored
    wanted, todo = [], []
    for batch in _side_rows(cfg, side, text):
        wanted.append(batch.select([side.id_column, "hash"]))
        todo.append(batch.filter(pc.invert(pc.is_in(batch.column("hash"), value_set=stored))))
    wanted, todo = pa.concat_tables(wanted), pa.concat_tables(todo)
    _, first = np.unique(todo.column("hash").to_numpy(zero_copy_only=False), return_index=True)
    return wanted, todo.take(pa.array(np.sort(first), pa.int64()))


def _side_rows(cfg: JobConfig, side: Side, text: str = TRANSLATED) -> Iterator[pa.Table]:
    """The rows a side needs, in batches: (article_id | image_id, file, hash)."""
    if side is TEXTS:
        # the original texts of exactly the articles the job scores (translate may have left some out)
        keep = None if query_texts(cfg, text) == cfg.query_texts else pq.read_table(
            parquet_files(cfg.query_texts, "query texts"), columns=["article_id"]).column("article_id")
        keep = None if keep is None else keep.cast(pa.string())
        for path in parquet_files(query_texts(cfg, text), "query texts"):
            for batch in read_batches(path, columns=["article_id", "query_text"]):
                if keep is not None:
                    batch = batch.filter(pc.is_in(batch.column("article_id").cast(pa.string()), value_set=keep))
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


def query_texts(cfg: JobConfig, text: str = TRANSLATED):
    """The query texts a backbone reads: the job's (English where it translates), or with `original` the prepared
    texts as the articles wrote them (multilingual models); the same articles either way."""
    return cfg.layout.query_texts(cfg.translate.enabled and text == TRANSLATED)


def prepared_rows(side: Side, todo: pa.Table, backbone: ResolvedBackbone, enc: EncodeConfig, max_retries: int):
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


def _preparation(side: Side, backbone: ResolvedBackbone, enc: EncodeConfig, in_memory: bool = False) -> tuple:
    """The CPU tasks' function and its arguments: tokenise texts, or read and decode images, as the resolved backbone
    says (clip's tokenizer and preprocess, or the open_clip model's own). `in_memory`: the same function for rows
    already in memory (a search query's text or image bytes), which decodes every image on the CPU."""
    open_clip = backbone.kind == "open_clip"
    if side is TEXTS:
        return (tokenize_texts if in_memory else read_and_tokenize_texts), {
            "context_length": backbone.context_length, "tokenizer": backbone.tokenizer if open_clip else None}
    return (decode_images if in_memory else read_and_decode_images), {
        "resolution": backbone.image_size[0], "max_pixels": enc.max_image_pixels, "draft": enc.jpeg_draft,
        "jpeg_to_actor": enc.decode == "gpu" and not in_memory, "alpha": enc.alpha,
        "preprocess": backbone.preprocess if open_clip else None}


def prepare_in_memory(side: Side, backbone: ResolvedBackbone, enc: EncodeConfig, rows: pa.Table) -> pa.Table:
    """`rows` (texts: hash, query_text; images: image) made ready for `side.encoder` as the CPU tasks make the rows
    they read from shards: a search query goes through the encode stage's own preparation."""
    fn, kwargs = _preparation(side, backbone, enc, in_memory=True)
    return fn(rows, **kwargs)


def encode_here(enc: EncodeConfig, backbone: ResolvedBackbone | str, side: Side, todo: pa.Table) -> pa.Table:
    """`todo`'s (hash, embedding, error) rows computed in this process by the pool's own code: the CPU tasks'
    function on all of it, then the model actor's class, whose fixed batch shape gives each row the embedding an
    actor would give it. For a small night, where starting a pool and loading its model is most of the cost."""
    import torch

    backbone = as_resolved(backbone, enc.download_root)
    fn, kwargs = _preparation(side, backbone, enc)
    ready = fn(units_of(todo, side.id_column, len(todo)), **kwargs)
    threads = torch.get_num_threads()  # the encoder sets the actors' thread count (same count, same bits)
    try:
        return side.encoder(backbone, enc)(ready)
    finally:
        torch.set_num_threads(threads)


def model_rows(cfg: JobConfig, enc: EncodeConfig, backbone: ResolvedBackbone | str, side: Side, todo: pa.Table):
    """The Ray dataset of `todo`'s (hash, embedding, error) rows: CPU tasks, then the model actor pool."""
    import ray

    backbone = as_resolved(backbone, enc.download_root)
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


def encode_new(cfg: JobConfig, enc: EncodeConfig, backbone: ResolvedBackbone | str, side: Side, todo: pa.Table,
               store: EmbeddingStore) -> dict:
    """Encode `todo` on a Ray Data actor pool, committing to the store every `encode.commit_rows` rows.

    Returns the rows encoded, and the seconds to the first encoded batch (start-up: actors, models, first inputs)
    and its rows. At most `ray.inline_rows` rows for CPU actors are encoded in this process instead (`encode_here`).
    """
    started = time.perf_counter()
    backbone = as_resolved(backbone, enc.download_root)
    name = backbone.name
    if len(todo) <= cfg.ray.inline_rows and not enc.num_gpus_per_actor:
        log(f"encode {name} {side.name}: {len(todo)} new rows, encoded in this process (ray.inline_rows)")
        return {"encoded": _commit(store, [encode_here(enc, backbone, side, todo)]), "in_process": True,
                "first_batch_seconds": round(time.perf_counter() - started, 2), "first_batch_rows": len(todo)}
    ds = model_rows(cfg, enc, backbone, side, todo)
    pending, done, first = [], 0, {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        first = first or {"first_batch_seconds": round(time.perf_counter() - started, 2),
                          "first_batch_rows": len(batch)}
        pending.append(batch)
        progress(done + sum(map(len, pending)), len(todo), part=f"{name} {side.name}")
        if sum(map(len, pending)) >= enc.commit_rows:
            done += _commit(store, pending)
            log(f"encode {name} {side.name}: {done}/{len(todo)} new rows stored")
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


def store_label(enc: EncodeConfig, backbone: ResolvedBackbone | None = None) -> str:
    """What besides the weights decides an embedding: the precision the actors run in (they check it), any
    preprocess other than clip's own, and ENCODER_VERSION; for an open_clip model also its architecture, preprocess
    and tokenizer (the same weights file may be given other settings). Embeddings that differ there never share a
    store folder."""
    variants = ((["nvjpeg"] if enc.decode == "gpu" else []) + (["draft"] if enc.jpeg_draft else [])
                + (["white"] if enc.alpha == "white" else []))
    if backbone is not None and backbone.kind == "open_clip":
        import hashlib

        settings = repr((backbone.arch, backbone.preprocess, backbone.tokenizer.kind, backbone.tokenizer.mode,
                         backbone.tokenizer.kwargs_json, backbone.context_length))
        variants.append("oc" + hashlib.sha256(settings.encode()).hexdigest()[:8])
    return "-".join([enc.precision, *variants, ENCODER_VERSION])
