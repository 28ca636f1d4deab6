"""evaluate stage: score each backbone's rankings (MRR@k, Recall@K) per direction, overall and per source."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from newsclip.backbones import slug
from newsclip.config import JobConfig
from newsclip.metrics import RECALL_KS, ranks_of_truth, scores
from newsclip.rank import rankings_stem
from newsclip.store import parquet_files, record_stage, write_text
from newsclip.translate.job import texts_source

COLUMNS = ["backbone", "source", "n", "mrr", *[f"recall@{k}" for k in RECALL_KS], "direction"]


def _padded(rows: list[list[str] | None], width: int) -> np.ndarray:
    """Ranked ids as a (queries, width) object matrix; a query without a ranking is a row of None (a miss)."""
    matrix = np.full((len(rows), width), None, dtype=object)
    for i, row in enumerate(rows):
        row = (row or [])[:width]
        matrix[i, : len(row)] = row
    return matrix


def score_rankings(queries: pl.DataFrame, rankings: pl.DataFrame, k: int, direction: str = "text_to_image") -> list[dict]:
    """Rows of metrics (source `all`, then one per source) for one direction.

    text_to_image: each query article's truth is its image. image_to_text: each image that belongs to a query
    article is a query, and any article published with it is a hit. A query with no ranking scores 0."""
    image_of = dict(zip(queries["article_id"], queries["image_id"]))
    if direction == "text_to_image":
        joined = queries.join(rankings, on="article_id", how="left")
        ranked = _padded(joined["image_ids"].to_list(), k)
    else:  # map ranked articles to their images: a hit is any article whose image is the query image
        joined = (queries.group_by("image_id", maintain_order=True).agg(pl.col("source").first())
                  .join(rankings, on="image_id", how="left"))
        ranked = _padded([[image_of.get(a) for a in row] if row else None for row in joined["article_ids"].to_list()],
                         k)
    ranks = ranks_of_truth(ranked, joined["image_id"].to_numpy())
    sources = joined["source"].to_numpy()
    rows = [{"source": "all", **scores(ranks, k)}]
    for source in sorted(set(sources)):
        rows.append({"source": source, **scores(ranks[sources == source], k)})
    return [{**row, "direction": direction} for row in rows]


def run(cfg: JobConfig) -> dict:
    out = cfg.output
    queries = pl.read_parquet(parquet_files(texts_source(cfg), "query texts"),
                              columns=["article_id", "image_id", "source"])
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    rows, knn = [], []
    for backbone in cfg.backbones:
        for direction in cfg.eval.directions:
            path = out / "rankings" / f"{rankings_stem(backbone, direction)}.parquet"
            rankings = pl.read_parquet(path)
            rows += [{"backbone": backbone, **row} for row in score_rankings(queries, rankings, cfg.eval.k, direction)]
            entry = stages.get(f"knn:{slug(backbone)}:{direction}", {})
            # an approximate index reports its recall against exact search, so nobody trusts it blindly
            knn.append({"backbone": backbone, "direction": direction, "index": entry.get("index"),
                        "recall_at_k_vs_exact": entry.get("recall_at_k")})
    frame = pl.DataFrame(rows).select(COLUMNS)
    csv_path = write_text(out / "metrics.csv", frame.write_csv())
    json_path = write_text(out / "metrics.json", json.dumps({"k": cfg.eval.k, "rows": rows, "knn": knn}, indent=2))
    return record_stage(out, "evaluate", [csv_path, json_path], rows=len(rows))
