"""Encode stage: CLIP text and image encoders as Ray Data actor pools, L2-normalised embeddings to Parquet."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from newsclip.backbones import checkpoint_id, load_backbone, slug
from newsclip.config import EncodeConfig, JobConfig
from newsclip.embedding_store import EmbeddingStore, content_hash, hash_array
from newsclip.images import ImageDecodeError, decode_image
from newsclip.pipeline import actor_retries, dataset_of, log
from newsclip.store import embedding_table, parquet_files, record_stage, staged_dir, write_table
from newsclip.translate.job import texts_source


def resolve_device(setting: str) -> str:
    """`auto` means CUDA only when torch sees a GPU and Ray (if running) assigned one to this worker."""
    import torch

    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "cpu"
    import ray

    return "cuda" if not ray.is_initialized() or ray.get_gpu_ids() else "cpu"


class _Encoder:
    """Loads one backbone once per actor; subclasses encode one side into (hash, embedding, error) rows."""

    def __init__(self, backbone: str, cfg: EncodeConfig, device: str | None = None):
        import torch

        torch.set_num_threads(cfg.torch_threads)
        self.torch = torch
        self.device = resolve_device(device or cfg.device)
        self.model, self.preprocess = load_backbone(backbone, self.device, cfg.download_root)
        self.half = cfg.fp16 and self.device == "cuda"
        if self.half:
            self.model = self.model.half()
        self.cfg = cfg

    def _result(self, hashes: list[str], vectors: np.ndarray, errors: list[str | None]) -> pa.Table:
        # A pyarrow table rather than a dict of numpy arrays: Ray would store a 2-D array as its own tensor
        # extension type, and the output contract is a plain fixed_size_list that any Arrow reader understands.
        table = embedding_table(hashes, vectors, "hash")
        return table.append_column("error", pa.array(errors, pa.string()))

    def _encode(self, encode, inputs) -> np.ndarray:
        """L2-normalised features, computed in batches of exactly `batch_size` rows (the last one zero-padded).

        A row's embedding then depends on its content alone: torch's CPU kernels gave bitwise-equal results for
        a row wherever it sat in a batch of a fixed size, but not across batch sizes (1e-6 apart). So a row
        encoded tonight in a batch of new rows equals the same row encoded in a full run, and rankings match."""
        size, out = self.cfg.batch_size, []
        with self.torch.inference_mode():
            for start in range(0, len(inputs), size):
                chunk = inputs[start:start + size]
                n = len(chunk)
                if n < size:
                    chunk = self.torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))])
                features = encode(chunk.to(self.device))[:n].float()
                out.append((features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.visual.output_dim), np.float32)


class ImageEncoder(_Encoder):
    """Decode, preprocess and encode a batch of images, keyed by the hash of their bytes; an undecodable image
    gets an error, not an exception."""

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = batch["image"]
        hashes = [content_hash(data or b"") for data in images]
        errors: list[str | None] = [None] * len(images)
        tensors, good = [], []
        for i, data in enumerate(images):
            try:
                tensors.append(self.preprocess(decode_image(data, self.cfg.max_image_pixels)))
                good.append(i)
            except ImageDecodeError as e:
                errors[i] = str(e)
        vectors = np.zeros((len(images), self.model.visual.output_dim), np.float32)
        if tensors:
            pixels = self.torch.stack(tensors)
            vectors[good] = self._encode(self.model.encode_image, pixels.half() if self.half else pixels)
        return self._result(hashes, vectors, errors)


class TextEncoder(_Encoder):
    """Tokenise (cut at the model's 77 tokens) and encode a batch of (hash, query_text) rows."""

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import clip

        texts = [str(t) for t in batch["query_text"]]
        tokens = clip.tokenize(texts, context_length=self.model.context_length, truncate=True)
        return self._result(list(batch["hash"]), self._encode(self.model.encode_text, tokens), [None] * len(texts))


@dataclass(frozen=True)
class Side:
    """One side of the retrieval: its encoder and the id column of its rows."""

    name: str  # "texts" | "images"
    encoder: type[_Encoder]
    id_column: str
    kind: str  # what a rejected row is, in rejects/


TEXTS = Side("texts", TextEncoder, "article_id", "article")
IMAGES = Side("images", ImageEncoder, "image_id", "image")


def wanted_rows(cfg: JobConfig, side: Side) -> pa.Table:
    """(id, hash) of every row this run needs embedded, plus `query_text` for texts and `file` for images."""
    if side is TEXTS:
        table = pq.read_table(parquet_files(texts_source(cfg), "query texts"), columns=["article_id", "query_text"])
        return table.append_column("hash", hash_array(table.column("query_text").to_pylist()))
    images = pq.read_table(cfg.output / "prepared" / "candidates.parquet")
    images = images.filter(pc.field("candidate"))
    return images.select(["image_id", "file"]).append_column("hash", images.column("image_hash"))


def _new_rows(wanted: pa.Table, store: EmbeddingStore) -> pa.Table:
    """One row per hash that the store does not hold yet."""
    stored = store.hashes()
    if stored:
        wanted = wanted.filter(pc.invert(pc.is_in(wanted.column("hash"), value_set=pa.concat_arrays(stored))))
    _, first = np.unique(wanted.column("hash").to_numpy(zero_copy_only=False), return_index=True)
    return wanted.take(pa.array(np.sort(first), pa.int64()))


def rows_per_block(rows: int, enc: EncodeConfig) -> int:
    """Rows per block fed to the encoders. An actor hands back its output when it has finished an input block, so
    blocks set both how the actors share the work (4 blocks each at least) and how often the store can commit
    (every `commit_rows`); at most 1,024 (about 100 MB of news photos), at least one batch."""
    return max(enc.batch_size, min(enc.commit_rows, 1024, -(-rows // (4 * enc.actors))))


def _dataset(side: Side, todo: pa.Table, enc: EncodeConfig):
    """Ray Data rows for the encoder: (hash, query_text) for texts, (image_id, image) read from the shards."""
    import ray

    rows = rows_per_block(len(todo), enc)
    if side is TEXTS:
        return dataset_of(todo.select(["hash", "query_text"]), -(-len(todo) // rows))
    files = sorted(set(todo.column("file").to_pylist()))
    ds = ray.data.read_parquet(files).select_columns(["image_id", "image"])
    # only the new images: a shard also holds images already stored, or not ranked at all; then blocks of `rows`
    # (a shard is one block per row group, often the whole file), cut as they stream by
    return (ds.map_batches(_keep_rows, fn_kwargs={"keep": todo.column("image_id")}, batch_format="pyarrow")
            .repartition(target_num_rows_per_block=rows))


def _keep_rows(batch: pa.Table, keep) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("image_id"), value_set=keep))


def encode_new(cfg: JobConfig, enc: EncodeConfig, backbone: str, side: Side, todo: pa.Table,
               store: EmbeddingStore) -> int:
    """Encode `todo` on a Ray Data actor pool, committing to the store every `encode.commit_rows` rows."""
    import ray

    ds = _dataset(side, todo, enc).map_batches(
        side.encoder,
        fn_constructor_kwargs={"backbone": backbone, "cfg": enc},
        batch_size=enc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=enc.actors),
        num_cpus=enc.num_cpus_per_actor,
        num_gpus=enc.num_gpus_per_actor,
        ray_remote_args_fn=partial(actor_retries, cfg.ray),
    )
    pending, done = [], 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        pending.append(batch)
        if sum(map(len, pending)) >= enc.commit_rows:
            done += _commit(store, pending)
            log(f"encode {backbone} {side.name}: {done}/{len(todo)} new rows stored")
    return done + _commit(store, pending)


def _commit(store: EmbeddingStore, pending: list[pa.Table]) -> int:
    if not pending:
        return 0
    table = pa.concat_tables(pending)
    pending.clear()
    store.append(table)
    return len(table)


def encode_side(cfg: JobConfig, backbone: str, side: Side) -> dict:
    """Bring the store up to date for one backbone and side, then commit this run's embeddings from it."""
    started = time.time()
    out, name, enc = cfg.output, slug(backbone), cfg.encode.for_backbone(backbone)
    store = EmbeddingStore(cfg.store, name, checkpoint_id(backbone, enc.download_root), precision(enc), side.name)
    wanted = wanted_rows(cfg, side)
    todo = _new_rows(wanted, store)
    encoded = encode_new(cfg, enc, backbone, side, todo, store) if len(todo) else 0
    relative = f"embeddings/{name}/{side.name}"
    rows, failures = 0, []
    with staged_dir(out, relative) as stage:
        for i, part in enumerate(store.lookup(wanted.column(side.id_column), wanted.column("hash"), side.id_column)):
            failed = pc.is_valid(part.column("error"))
            # the hash beside the embedding: the knn stage tells from it which rows are new since its last run
            good = part.filter(pc.invert(failed)).select([side.id_column, "embedding", "hash"])
            if len(good):
                write_table(good, stage / f"part-{i:05d}.parquet")
            rows += len(good)
            bad = part.filter(failed)
            failures.append(pa.table({"id": bad.column(side.id_column), "reason": bad.column("error")}))
        if rows == 0:
            reasons = sorted(set(pa.concat_tables(failures).column("reason").to_pylist()))[:3]
            raise ValueError(f"encode {backbone} {side.name}: no row could be encoded; reasons: {reasons}")
    rejects = pa.concat_tables(failures)
    rejects = rejects.append_column("kind", pa.array([side.kind] * len(rejects), pa.string()))
    write_table(rejects.append_column("stage", pa.array([f"encode:{backbone}"] * len(rejects), pa.string())),
                out / "rejects" / f"encode-{name}-{side.name}.parquet")
    reused = len(wanted) - int(pc.sum(pc.is_in(wanted.column("hash"), value_set=todo.column("hash"))).as_py() or 0)
    return record_stage(out, f"encode:{name}:{side.name}", parquet_files(out / relative, relative), backbone=backbone,
                        rows=rows, rejected=len(rejects), encoded=encoded, reused=reused, store=str(store.dir),
                        batch_size=enc.batch_size, fp16=enc.fp16, num_gpus_per_actor=enc.num_gpus_per_actor,
                        seconds=round(time.time() - started, 2))


def precision(enc: EncodeConfig) -> str:
    """fp16 (on a GPU only) gives other numbers than fp32: a store of its own."""
    return "fp16" if enc.fp16 and enc.on_gpu else "fp32"


def run(cfg: JobConfig) -> list[dict]:
    """Encode both sides for every backbone: `encode.parallel_backbones` backbones at a time, each with its own
    actor pools (side by side on a cluster; one after another on one GPU or a laptop)."""
    from concurrent.futures import ThreadPoolExecutor

    def both_sides(backbone: str) -> list[dict]:
        return [encode_side(cfg, backbone, side) for side in (TEXTS, IMAGES)]

    with ThreadPoolExecutor(max_workers=cfg.encode.parallel_backbones) as pool:
        return [entry for entries in pool.map(both_sides, cfg.backbones) for entry in entries]
