"""Encode stage: per backbone and side, CPU tasks decode images and tokenise texts, model actors encode them
(newsclip.workers.encoders, Ray Data actor pools); new embeddings go to the content-hash store, and this run's
embeddings are committed from it to Parquet."""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from newsclip.config import JobConfig
from newsclip.encoding import IMAGES, TEXTS, Side, encode_new, store_label, wanted_rows
from newsclip.names import encode_entry
from newsclip.retrieval.backbone_values import ORIGINAL, TRANSLATED, ResolvedBackbone
from newsclip.retrieval.registry import is_open_clip, missing_files
from newsclip.runtime.embedding_store import EmbeddingStore, write_refs
from newsclip.runtime.rejects import write_rejects
from newsclip.runtime.stage import ActorRequest, Needs, Stage
from newsclip.runtime.store import parquet_files, record_stage, staged_dir, write_table

__all__ = ["run"]  # the stage; everything else here is its own business


def encode_side(cfg: JobConfig, resolved: ResolvedBackbone, side: Side) -> dict:
    """Bring the store up to date for one backbone and side, then commit this run's embeddings from it."""
    backbone, name = resolved.name, resolved.slug
    out, enc = cfg.output, cfg.encode.for_backbone(backbone, resolved.image_gflops)
    store = EmbeddingStore(cfg.store, name, resolved.checkpoint_id, store_label(enc, resolved), side.name)
    stored = store.hashes()
    wanted, todo = wanted_rows(cfg, side, pa.concat_arrays(stored) if stored else None, resolved.text)
    stats = encode_new(cfg, enc, resolved, side, todo, store) if len(todo) else {"encoded": 0}
    folder = cfg.layout.embeddings_of(name, side.name)
    relative = cfg.layout.relative(folder)
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
    rejected = write_rejects(out, f"encode-{name}-{side.name}", f"encode:{backbone}", rejects)
    texts_read = resolved if cfg.translate.enabled else replace(resolved, text=ORIGINAL)
    reused = len(wanted) - int(pc.sum(pc.is_in(wanted.column("hash"), value_set=todo.column("hash"))).as_py() or 0)
    return record_stage(out, encode_entry(backbone, side.name), parquet_files(folder, relative),
                        backbone=backbone, rejects=str(rejected.relative_to(out)),
                        rows=rows, rejected=len(rejects), **stats, reused=reused, store=str(store.dir),
                        refs=write_refs(out, store, wanted.column("hash")),  # the store rows this run uses
                        batch_size=enc.batch_size, device=enc.device, precision=enc.precision, decode=enc.decode,
                        jpeg_draft=enc.jpeg_draft, num_gpus_per_actor=enc.num_gpus_per_actor,
                        # what the report names: where the model comes from, its preprocess, tokenizer and the texts
                        # it read (without translation every backbone reads the originals)
                        model=texts_read.describe(), text=texts_read.text)


def _run(cfg: JobConfig) -> list[dict]:
    """Encode both sides for every backbone: `encode.parallel_backbones` backbones at a time, each with its own
    actor pools (side by side on a cluster; one after another on one GPU or a laptop)."""
    from concurrent.futures import ThreadPoolExecutor

    def both_sides(backbone: ResolvedBackbone) -> list[dict]:
        return [encode_side(cfg, backbone, side) for side in (TEXTS, IMAGES)]

    with ThreadPoolExecutor(max_workers=cfg.encode.parallel_backbones) as pool:
        return [entry for entries in pool.map(both_sides, cfg.resolved_backbones.values()) for entry in entries]


def _checkpoints(cfg: JobConfig) -> dict[str, str]:
    """The backbones' weights as they are now: retrained or replaced weights under the same name rerun the stage
    (and an open_clip model given other settings or texts)."""
    return {b.name: b.checkpoint_id if b.kind == "clip" and b.text == TRANSLATED else
            f"{b.checkpoint_id}:{store_label(cfg.encode, b)}:{b.text}" for b in cfg.resolved_backbones.values()}


def _needs(cfg: JobConfig) -> Needs:
    """Every backbone's weights, and its model actors' CPUs and GPUs (its own GPU key where it has one)."""
    # files are found here, not read (a CLIP checkpoint is read when the stage resolves it); an open_clip model's cost
    # comes from its resolved config (the registry's names have theirs, a checkpoint counts as mid-sized)
    missing = missing_files(list(cfg.backbones), cfg.backbone_options, cfg.encode.download_root, cfg.encode.hf_cache)
    actors = []
    for backbone in cfg.backbones:
        open_clip = is_open_clip(backbone, cfg.backbone_options.get(backbone))
        gflops = cfg.resolved(backbone).image_gflops if open_clip and not missing else None
        enc, own = cfg.encode.for_backbone(backbone, gflops), cfg.encode.per_backbone.get(backbone)
        gpu_key = "num_gpus_per_actor" if own is None or own.num_gpus_per_actor is None else \
            f"per_backbone.{backbone}.num_gpus_per_actor"
        actors.append(ActorRequest(f"encode {backbone}", enc.num_cpus_per_actor, enc.num_gpus_per_actor,
                                   "encode.num_cpus_per_actor", f"encode.{gpu_key}"))
    return Needs(tuple(missing), tuple(actors))


run = Stage("encode", _run, external_inputs=_checkpoints, needs=_needs)
