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
from newsclip.store import parquet_files, read_embeddings, record_stage, write_table, write_text


def _query_batches(folder, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (ids, vectors) from the text embeddings, never all of them at once."""
    for path in parquet_files(folder, f"text embeddings {folder}"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["article_id", "embedding"]):
            column = batch.column("embedding")
            vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
            yield batch.column("article_id").to_numpy(zero_copy_only=False), vectors


def tsv_lines(query_ids: np.ndarray, ranked: np.ndarray) -> str:
    """The official NewsImages format: article_id<TAB>image_id_1<TAB>...<TAB>image_id_k, one line per article."""
    return "".join("\t".join([str(q), *map(str, row)]) + "\n" for q, row in zip(query_ids, ranked))


def rank_backbone(cfg: JobConfig, backbone: str) -> dict:
    started = time.time()
    out, name = cfg.output, slug(backbone)
    image_ids, image_vectors = read_embeddings(out / "embeddings" / name / "images", "image_id")
    _, first = np.unique(image_ids, return_index=True)  # an id encoded twice (duplicate input rows) counts once
    if len(first) < len(image_ids):
        keep = np.sort(first)
        image_ids, image_vectors = image_ids[keep], image_vectors[keep]
    result = knn.search(image_ids, image_vectors,
                        _query_batches(out / "embeddings" / name / "texts", cfg.knn.query_batch_size), cfg.knn)
    table = pa.table({
        "article_id": pa.array(result.query_ids, pa.string()),
        "image_ids": pa.array([list(r) for r in result.ids], pa.list_(pa.string())),
        "scores": pa.array([list(r) for r in result.scores], pa.list_(pa.float32())),
    })
    files = [write_table(table, out / "rankings" / f"{name}.parquet"),
             write_text(out / "rankings" / f"{name}.tsv", tsv_lines(result.query_ids, result.ids))]
    return record_stage(out, f"knn:{name}", files, backbone=backbone, queries=len(result.query_ids),
                        candidates=len(image_ids), k=int(result.ids.shape[1]), shards=cfg.knn.shards,
                        index=cfg.knn.index, recall_at_k=result.recall_at_k, seconds=round(time.time() - started, 2))


def run(cfg: JobConfig) -> list[dict]:
    return [rank_backbone(cfg, backbone) for backbone in cfg.backbones]
