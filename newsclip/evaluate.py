"""evaluate stage: score each backbone's rankings (MRR@k, Recall@K) per direction, overall and per source,
with seeded bootstrap 95% intervals and paired comparisons between backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from newsclip.backbones import OPENAI_NAMES, slug
from newsclip.bootstrap import ci_columns, ci_rows, paired_rows
from newsclip.config import JobConfig
from newsclip.metrics import ranks_of_truth, scores
from newsclip.rank import rankings_stem
from newsclip.store import parquet_files, record_stage, write_text


def _padded(rows: list[list[str] | None], width: int) -> np.ndarray:
    """Ranked ids as a (queries, width) object matrix; a query without a ranking is a row of None (a miss)."""
    matrix = np.full((len(rows), width), None, dtype=object)
    for i, row in enumerate(rows):
        row = (row or [])[:width]
        matrix[i, : len(row)] = row
    return matrix


def query_ranks(queries: pl.DataFrame, rankings: pl.DataFrame, k: int,
                direction: str = "text_to_image") -> tuple[np.ndarray, np.ndarray]:
    """Per-query 1-based ranks of the truth (0 = absent) and each query's source, in an order set by `queries` alone
    (so two backbones' arrays are aligned by query).

    text_to_image: each query article's truth is its image. image_to_text: each image that belongs to a query
    article is a query, and any article published with it is a hit. A query with no ranking is a miss."""
    if direction == "text_to_image":
        joined = queries.join(rankings, on="article_id", how="left", maintain_order="left")
        ranked = _padded(joined["image_ids"].to_list(), k)
    else:  # map ranked articles to their images: a hit is any article whose image is the query image
        image_of = dict(zip(queries["article_id"], queries["image_id"]))
        joined = (queries.group_by("image_id", maintain_order=True).agg(pl.col("source").first())
                  .join(rankings, on="image_id", how="left", maintain_order="left"))
        ranked = _padded([[image_of.get(a) for a in row] if row else None for row in joined["article_ids"].to_list()],
                         k)
    return ranks_of_truth(ranked, joined["image_id"].to_numpy()), joined["source"].to_numpy()


def score_rankings(queries: pl.DataFrame, rankings: pl.DataFrame, k: int,
                   direction: str = "text_to_image") -> list[dict]:
    """Rows of metrics for one direction: source `all`, then one per source."""
    ranks, sources = query_ranks(queries, rankings, k, direction)
    rows = [{"source": "all", **scores(ranks, k)}]
    rows += [{"source": s, **scores(ranks[sources == s], k)} for s in sorted(set(sources))]
    return [{**row, "direction": direction} for row in rows]


def run(cfg: JobConfig) -> dict:
    out = cfg.output
    # sorted: the bootstrap resamples by position, so its intervals must not depend on the order of the files
    queries = pl.read_parquet(parquet_files(cfg.query_texts, "query texts"),
                              columns=["article_id", "image_id", "source"]).sort("article_id")
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    rows, paired, knn = [], [], []
    for direction in cfg.eval.directions:
        ranks, sources = {}, None
        for backbone in [*cfg.backbones, *cfg.fusion]:
            rankings = pl.read_parquet(out / "rankings" / f"{rankings_stem(backbone, direction)}.parquet")
            ranks[backbone], sources = query_ranks(queries, rankings, cfg.eval.k, direction)
            entry = stages.get(f"knn:{slug(backbone)}:{direction}", {})
            # an approximate index reports its recall against exact search, so nobody trusts it blindly
            knn.append({"backbone": backbone, "direction": direction, "index": entry.get("index"),
                        "recall_at_k_vs_exact": entry.get("recall_at_k"),
                        "short_lines": entry.get("short_lines", 0), "short_reason": entry.get("short_reason")})
        rows += ci_rows(ranks, sources, cfg.eval.k, direction, b=cfg.eval.bootstrap, seed=cfg.eval.seed)
        paired += paired_rows(ranks, cfg.eval.k, b=cfg.eval.bootstrap, seed=cfg.eval.seed, direction=direction)
    frame = pl.DataFrame(rows).select(ci_columns())
    results = [_clip_benchmark_result(cfg, backbone, rows) for backbone in [*cfg.backbones, *cfg.fusion]]
    csv_path = write_text(out / "metrics.csv", frame.write_csv())
    json_path = write_text(out / "metrics.json", json.dumps(
        {"k": cfg.eval.k, "bootstrap": cfg.eval.bootstrap, "rows": rows, "paired": paired, "knn": knn}, indent=2))
    return record_stage(out, "evaluate", [csv_path, json_path, *results], rows=len(rows))


def _clip_benchmark_result(cfg: JobConfig, backbone: str, rows: list[dict]) -> Path:
    """`results/<slug>.json` in the style of CLIP_benchmark: one file per backbone run, the overall metrics."""
    metrics = {}
    for row in rows:
        if row["backbone"] == backbone and row["source"] == "all":
            prefix = "text_retrieval" if row["direction"] == "image_to_text" else "image_retrieval"
            metrics.update({f"{prefix}_{key.replace('@', '_at_')}": value for key, value in row.items()
                            if key not in ("backbone", "source", "direction", "n")})
    pretrained = "openai" if backbone in OPENAI_NAMES else "newsclip"
    result = {"dataset": cfg.name, "model": backbone, "pretrained": pretrained, "task": "zeroshot_retrieval",
              "language": "en", "k": cfg.eval.k, "metrics": metrics}
    return write_text(cfg.output / "results" / f"{slug(backbone)}.json", json.dumps(result, indent=2))
