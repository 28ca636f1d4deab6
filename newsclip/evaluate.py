"""evaluate stage: score each backbone's rankings (MRR@k, Recall@K) overall and per source."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from newsclip.backbones import slug
from newsclip.config import JobConfig
from newsclip.metrics import RECALL_KS, ranks_of_truth, scores
from newsclip.store import parquet_files, record_stage, write_text
from newsclip.translate.job import texts_source

COLUMNS = ["backbone", "source", "n", "mrr", *[f"recall@{k}" for k in RECALL_KS]]


def score_rankings(queries: pl.DataFrame, rankings: pl.DataFrame, k: int) -> list[dict]:
    """Rows of metrics (source `all`, then one per source); a query with no ranking scores 0."""
    joined = queries.join(rankings, on="article_id", how="left")
    width = max(k, 1)
    ranked = np.array([(row or [])[:width] + [None] * (width - len(row or [])) for row in joined["image_ids"].to_list()],
                      dtype=object).reshape(len(joined), width)
    ranks = ranks_of_truth(ranked, joined["image_id"].to_numpy())
    sources = joined["source"].to_numpy()
    rows = [{"source": "all", **scores(ranks, k)}]
    for source in sorted(set(sources)):
        rows.append({"source": source, **scores(ranks[sources == source], k)})
    return rows


def run(cfg: JobConfig) -> dict:
    out = cfg.output
    queries = pl.read_parquet(parquet_files(texts_source(cfg), "query texts"),
                              columns=["article_id", "image_id", "source"])
    rows = []
    for backbone in cfg.backbones:
        rankings = pl.read_parquet(out / "rankings" / f"{slug(backbone)}.parquet", columns=["article_id", "image_ids"])
        rows += [{"backbone": backbone, **row} for row in score_rankings(queries, rankings, cfg.eval.k)]
    frame = pl.DataFrame(rows).select(COLUMNS)
    csv_path = write_text(out / "metrics.csv", frame.write_csv())
    json_path = write_text(out / "metrics.json", json.dumps({"k": cfg.eval.k, "rows": rows}, indent=2))
    return record_stage(out, "evaluate", [csv_path, json_path], rows=len(rows))
