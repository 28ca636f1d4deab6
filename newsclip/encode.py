"""Encode stage: CLIP text and image encoders as Ray Data actor pools, L2-normalised embeddings to Parquet."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.backbones import load_backbone, slug
from newsclip.config import EncodeConfig, JobConfig
from newsclip.images import ImageDecodeError, decode_image
from newsclip.pipeline import actor_retries
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
    """Loads one backbone once per actor; subclasses encode one side."""

    id_column: str

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

    def _result(self, ids: np.ndarray, vectors: np.ndarray, errors: list[str | None]) -> pa.Table:
        # A pyarrow table rather than a dict of numpy arrays: Ray would store a 2-D array as its own tensor
        # extension type, and the output contract is a plain fixed_size_list that any Arrow reader understands.
        table = embedding_table(ids, vectors, self.id_column)
        return table.append_column("error", pa.array(errors, pa.string()))

    def _normalise(self, features) -> np.ndarray:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy()


class ImageEncoder(_Encoder):
    """Decode, preprocess and encode a batch of images; an undecodable image gets an error, not an exception."""

    id_column = "image_id"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = batch["image_id"]
        errors: list[str | None] = [None] * len(ids)
        tensors, good = [], []
        for i, data in enumerate(batch["image"]):
            try:
                tensors.append(self.preprocess(decode_image(data, self.cfg.max_image_pixels)))
                good.append(i)
            except ImageDecodeError as e:
                errors[i] = str(e)
        dim = self.model.visual.output_dim
        vectors = np.zeros((len(ids), dim), np.float32)
        if tensors:
            pixels = self.torch.stack(tensors).to(self.device)
            with self.torch.inference_mode():
                vectors[good] = self._normalise(self.model.encode_image(pixels.half() if self.half else pixels))
        return self._result(ids, vectors, errors)


class TextEncoder(_Encoder):
    """Tokenise (cut at the model's 77 tokens) and encode a batch of texts."""

    id_column = "article_id"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import clip

        texts = [str(t) for t in batch["query_text"]]
        tokens = clip.tokenize(texts, context_length=self.model.context_length, truncate=True).to(self.device)
        with self.torch.inference_mode():
            vectors = self._normalise(self.model.encode_text(tokens))
        return self._result(batch["article_id"], vectors, [None] * len(texts))


@dataclass(frozen=True)
class Side:
    """One side of the retrieval: which encoder, which prepared input, which columns."""

    name: str  # "texts" | "images"
    encoder: type[_Encoder]
    columns: tuple[str, str]


TEXTS = Side("texts", TextEncoder, ("article_id", "query_text"))
IMAGES = Side("images", ImageEncoder, ("image_id", "image"))


def _candidate_images(cfg: JobConfig) -> tuple[list[str], pa.Array]:
    """The input image shards that hold candidate images, and the candidate ids (both decided by prepare)."""
    import pyarrow.compute as pc

    images = pq.read_table(cfg.output / "prepared" / "candidates.parquet")
    images = images.filter(pc.field("candidate"))
    return sorted(set(images.column("file").to_pylist())), images.column("image_id").combine_chunks()


def encode_side(cfg: JobConfig, backbone: str, side: Side) -> dict:
    """Run one encoder over its prepared input as a Ray Data actor pool and commit the embeddings."""
    import ray

    started = time.time()
    out = cfg.output
    if side is TEXTS:
        files = [str(p) for p in parquet_files(texts_source(cfg), "query texts")]
        keep = None
    else:
        files, keep = _candidate_images(cfg)
    # enough blocks that reading, decoding and encoding overlap and every actor gets work (small shards would
    # otherwise be merged into one block and run strictly one after another)
    blocks = max(len(files), 4 * cfg.encode.actors, 8)
    ds = ray.data.read_parquet(files, override_num_blocks=blocks).select_columns(list(side.columns))
    if keep is not None:
        # only candidate images: a shard can also hold images that are not ranked (prepare decided which)
        ds = ds.map_batches(_keep_rows, fn_kwargs={"keep": keep}, batch_format="pyarrow")
    enc = cfg.encode
    ds = ds.map_batches(
        side.encoder,
        fn_constructor_kwargs={"backbone": backbone, "cfg": enc},
        batch_size=enc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=enc.actors),
        num_cpus=enc.num_cpus_per_actor,
        num_gpus=enc.num_gpus_per_actor,
        ray_remote_args_fn=partial(actor_retries, cfg.ray),
    )
    relative = f"embeddings/{slug(backbone)}/{side.name}"
    with staged_dir(out, relative) as stage:
        raw = stage / "_raw"
        ds.write_parquet(str(raw))
        rows, rejects = _split_rejects(raw, stage, side.columns[0])
        if rows == 0:
            raise ValueError(f"encode {backbone} {side.name}: no row could be encoded; reasons: "
                             f"{sorted(set(rejects.column('reason').to_pylist()))[:3]}")
    rejects_path = out / "rejects" / f"encode-{slug(backbone)}-{side.name}.parquet"
    write_table(rejects.append_column("stage", pa.array([f"encode:{backbone}"] * len(rejects), pa.string())),
                rejects_path)
    files_out = parquet_files(out / relative, relative)
    return record_stage(out, f"encode:{slug(backbone)}:{side.name}", files_out, backbone=backbone, rows=rows,
                        rejected=len(rejects), seconds=round(time.time() - started, 2))


def _keep_rows(batch: pa.Table, keep) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("image_id"), value_set=keep))


def _split_rejects(raw: Path, stage: Path, id_column: str) -> tuple[int, pa.Table]:
    """Move good rows from Ray's raw output into `stage/part-*.parquet`; return the row count and the failures."""
    import pyarrow.compute as pc

    rows, failures = 0, []
    raw_files = sorted(raw.glob("*.parquet"))
    for i, path in enumerate(raw_files):
        table = pq.read_table(path)
        failed = pc.is_valid(table.column("error"))
        good = table.filter(pc.invert(failed)).select([id_column, "embedding"])
        rows += len(good)
        if len(good):
            write_table(good, stage / f"part-{i:05d}.parquet")
        bad = table.filter(failed)
        failures.append(pa.table({"id": bad.column(id_column), "reason": bad.column("error")}))
    for path in raw.iterdir():
        path.unlink()
    raw.rmdir()
    empty = pa.table({"id": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    return rows, pa.concat_tables([empty, *failures])


def run(cfg: JobConfig) -> list[dict]:
    """Encode both sides for every backbone of the job."""
    return [encode_side(cfg, backbone, side) for backbone in cfg.backbones for side in (TEXTS, IMAGES)]
