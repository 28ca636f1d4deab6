"""knn stage: rank the candidate images for every query text with a sharded exact FAISS search."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip import knn
from newsclip.backbones import slug
from newsclip.config import JobConfig
from newsclip.store import parquet_files, read_embeddings, record_stage, vectors_of, write_table, write_text

# direction -> (query side, query id, database side, database id); text_to_image is the NewsImages task
DIRECTIONS = {
    "text_to_image": ("texts", "article_id", "images", "image_id"),
    "image_to_text": ("images", "image_id", "texts", "article_id"),
}


def rankings_stem(backbone: str, direction: str) -> str:
    """`rankings/<slug>` for the task's direction (the official file names), `<slug>.image_to_text` for the other."""
    return slug(backbone) if direction == "text_to_image" else f"{slug(backbone)}.{direction}"


def _query_batches(folder, id_column: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (ids, vectors) from an embeddings folder, never all of them at once."""
    for path in parquet_files(folder, f"embeddings {folder}"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=[id_column, "embedding"]):
            yield batch.column(id_column).to_numpy(zero_copy_only=False), vectors_of(batch.column("embedding"))


def tsv_lines(query_ids: np.ndarray, ranked: np.ndarray) -> str:
    """The official NewsImages format: article_id<TAB>image_id_1<TAB>...<TAB>image_id_k, one line per article."""
    return "".join("\t".join([str(q), *map(str, row)]) + "\n" for q, row in zip(query_ids, ranked))


def rank(cfg: JobConfig, backbone: str, direction: str) -> dict:
    started = time.time()
    out, name = cfg.output, slug(backbone)
    query_side, query_id, db_side, db_id = DIRECTIONS[direction]
    db_ids, db_vectors = read_embeddings(out / "embeddings" / name / db_side, db_id)
    _, first = np.unique(db_ids, return_index=True)  # an id encoded twice (duplicate input rows) counts once
    if len(first) < len(db_ids):
        keep = np.sort(first)
        db_ids, db_vectors = db_ids[keep], db_vectors[keep]
    queries = _query_batches(out / "embeddings" / name / query_side, query_id, cfg.knn.query_batch_size)
    result = knn.search(db_ids, db_vectors, queries, cfg.knn)
    # in query id order: the files then depend on the data alone, not on the order the store was filled in
    order = np.argsort(result.query_ids, kind="stable")
    query_ids, ranked, scores = result.query_ids[order], result.ids[order], result.scores[order]
    table = pa.table({
        query_id: pa.array(query_ids, pa.string()),
        f"{db_id}s": pa.array([list(r) for r in ranked], pa.list_(pa.string())),
        "scores": pa.array([list(r) for r in scores], pa.list_(pa.float32())),
    })
    stem = rankings_stem(backbone, direction)
    files = [write_table(table, out / "rankings" / f"{stem}.parquet"),
             write_text(out / "rankings" / f"{stem}.tsv", tsv_lines(query_ids, ranked))]
    return record_stage(out, f"knn:{name}:{direction}", files, backbone=backbone, direction=direction,
                        queries=len(result.query_ids), candidates=len(db_ids), k=int(result.ids.shape[1]),
                        shards=cfg.knn.shards, index=cfg.knn.index, backend=cfg.knn.backend,
                        recall_at_k=result.recall_at_k, seconds=round(time.time() - started, 2))


def run(cfg: JobConfig) -> list[dict]:
    from newsclip.fusion import fuse_stage

    entries = [rank(cfg, backbone, direction) for backbone in cfg.backbones for direction in cfg.eval.directions]
    return entries + [fuse_stage(cfg, name, direction) for name in cfg.fusion for direction in cfg.eval.directions]
