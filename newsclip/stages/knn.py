"""knn stage: rank the candidate images for every query text with a sharded search (exact by default)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from newsclip.config import JobConfig
from newsclip.names import DIRECTIONS, encode_entry, knn_entry, rankings_stem, slug
from newsclip.retrieval import search
from newsclip.retrieval.nightly import NightlyMerge, added_rows
from newsclip.runtime.embedding_folders import DatabaseFolder, in_id_order, sample_vectors
from newsclip.runtime.fused_rankings import fuse_rankings
from newsclip.runtime.rankings import RankingsWriter, last_rankings, ranked_lists
from newsclip.runtime.stage import ActorRequest, Needs, Stage
from newsclip.runtime.store import read_batches, read_manifest, record_stage, vectors_of

__all__ = ["run"]  # the stage; everything else here is its own business


def _streamed(knn: search.KnnConfig, rows: int) -> search.KnnConfig:
    """`knn` with its shards built one at a time as the database streams in (`max_shard_rows`): the driver then
    never holds the database's vectors twice, nor at all with `backend: ray`."""
    if knn.max_shard_rows is not None:
        return knn
    return dataclasses.replace(knn, max_shard_rows=max(1, -(-rows // knn.shards)))


def _last(cfg: JobConfig, stem: str, entry_name: str, stores: list[str]) -> tuple[Path, pa.Table] | None:
    """Last run's rankings (their path) and the database they were ranked against, when this run can build on
    them: the same embeddings store (checkpoint), the same k and an exact index."""
    entry = read_manifest(cfg.output).get("stages", {}).get(entry_name, {})
    if (cfg.knn.index != "flat" or entry.get("index") != "flat" or entry.get("stores") != stores
            or entry.get("k") != cfg.knn.k):
        return None
    return last_rankings(cfg.output, stem)


def rank(cfg: JobConfig, backbone: str, direction: str) -> dict:
    """Top-k database rows per query, written in query id order as the queries stream by (the files then depend
    on the data alone, not on the order the store was filled in). After a nightly run's encode, a query whose text
    (or image) is unchanged and none of whose last top-k rows was deleted or changed is searched against the added
    rows only and merged with its last top-k (`NightlyMerge`); every other query is searched in full. Both give
    what a full search gives, bit for bit. Ranked ids are positions into the sorted database ids until they are
    written: the driver holds the database and one batch of queries, not k ids per query."""
    out, name, stem = cfg.output, slug(backbone), rankings_stem(backbone, direction)
    query_side, query_id, db_side, db_id = DIRECTIONS[direction]
    db_list = f"{db_id}s"
    folders = {side: cfg.layout.embeddings_of(name, side) for side in (query_side, db_side)}
    db = DatabaseFolder(folders[db_side], db_id)
    database = db.table
    stores = [read_manifest(out)["stages"][encode_entry(backbone, side)]["store"] for side in ("texts", "images")]
    previous = _last(cfg, stem, knn_entry(backbone, direction), stores)
    spill = cfg.layout.staging / f"knn-{stem}-{uuid.uuid4().hex[:8]}"
    counts = {"queries": 0, "merged": 0, "searched_in_full": 0}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, spill, ignore_errors=True)
        added = None
        if previous is not None:
            rows = added_rows(previous[1], database)
            counts["added_candidates"] = int(rows.sum())
            if rows.any():
                added = stack.enter_context(search.Index(None, db.chunks(rows), _streamed(cfg.knn, int(rows.sum()))))
        index = stack.enter_context(search.Index(None, db.chunks(), _streamed(cfg.knn, len(database))))
        approximate = _approximate(cfg.knn, index, folders[query_side])
        sorted_ids = pa.array(index.sorted_ids, pa.string())
        nightly = None
        if previous is not None:
            last_path, last_database = previous
            nightly = NightlyMerge(read_batches(last_path, cfg.knn.query_batch_size), last_database, database,
                                   sorted_ids, added, index.k, query_id, db_list)
        writer = stack.enter_context(RankingsWriter(out, stem, query_id, db_list, database))
        for chunk in in_id_order(folders[query_side], query_id, cfg.knn.query_batch_size, spill):
            qids = chunk.column(query_id).combine_chunks().cast(pa.string())
            hashes = chunk.column("hash").combine_chunks()
            vectors = vectors_of(chunk.column("embedding"))
            keys = np.empty((len(chunk), index.k), np.int64)
            scores = np.empty((len(chunk), index.k), np.float32)
            merged = np.zeros(len(chunk), bool)
            if nightly is not None:
                merged, keys_merged, scores_merged = nightly.merge(qids, hashes, vectors)
                keys[merged], scores[merged] = keys_merged, scores_merged
            if not merged.all():
                keys[~merged], scores[~merged] = index.search(vectors[~merged])
            writer.write(qids, ranked_lists(keys, sorted_ids), scores, hashes)
            counts["queries"] += len(chunk)
            counts["merged"] += int(merged.sum())
            counts["searched_in_full"] += int((~merged).sum())
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed batches' pages otherwise
        recall = index.recall_at_k()
        engines = sorted({s["engine"] for s in index.shard_stats})
    return record_stage(out, knn_entry(backbone, direction), writer.paths, backbone=backbone, direction=direction,
                        candidates=index.n, k=cfg.knn.k, shards=cfg.knn.shards, index=cfg.knn.index,
                        engine=engines[0] if len(engines) == 1 else engines, backend=cfg.knn.backend,
                        recall_at_k=recall, recall_queries=index.recall_queries, **approximate, stores=stores,
                        **counts,
                        **writer.short_lines(cfg.knn.k, index.n, f"knn {backbone} {direction}"))


def _approximate(knn: search.KnnConfig, index: search.Index, queries: Path) -> dict:
    """An approximate index's knob (nprobe or ef_search) for the manifest entry: with `target_recall`, first chosen
    on a seeded sample of the queries (seed knn.seed + 1: not the sample its recall is then measured on), and what
    was tried with it (`tuning`). Nothing for the exact index."""
    if knn.index == "flat":
        return {}
    if knn.target_recall is None:
        return {"knob": {"nprobe": knn.nprobe} if knn.index == "ivf" else {"ef_search": knn.ef_search}}
    tuning = index.tune(sample_vectors(queries, knn.recall_sample, knn.seed + 1), knn.target_recall)
    return {"knob": {tuning["knob"]: tuning["value"]}, "tuning": tuning}


def _run(cfg: JobConfig) -> list[dict]:
    entries = [rank(cfg, backbone, direction) for backbone in cfg.backbones for direction in cfg.eval.directions]
    return entries + [fuse_rankings(cfg, name, direction) for name in cfg.fusion for direction in cfg.eval.directions]


def _needs(cfg: JobConfig) -> Needs:
    """With `backend: ray`, one actor per shard."""
    if cfg.knn.backend != "ray":
        return Needs()
    return Needs(actors=(ActorRequest("knn shards", cfg.knn.num_cpus_per_actor, cfg.knn.num_gpus_per_actor,
                                      "knn.num_cpus_per_actor", "knn.num_gpus_per_actor"),))


run = Stage("knn", _run, needs_ray=lambda cfg: cfg.knn.backend == "ray", needs=_needs)
