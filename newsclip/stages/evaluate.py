"""evaluate stage: score each backbone's rankings (MRR@k, Recall@K) per direction, overall and per source,
with seeded bootstrap 95% intervals and paired comparisons between backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from newsclip.config import JobConfig
from newsclip.names import DIRECTIONS, knn_entry, rankings_stem, slug
from newsclip.retrieval.backbones import OPENAI_NAMES
from newsclip.retrieval.bootstrap import ci_columns, ci_rows, paired_rows
from newsclip.retrieval.metrics import metric_names, ranks_of_truth, scores
from newsclip.runtime.rejects import read_rejects
from newsclip.runtime.store import parquet_files, record_stage, write_text

__all__ = ["run"]  # the stage; everything else here is its own business


def _padded(rows: list[list[str] | None], width: int) -> np.ndarray:
    """Ranked ids as a (queries, width) object matrix; a query without a ranking is a row of None (a miss)."""
    matrix = np.full((len(rows), width), None, dtype=object)
    for i, row in enumerate(rows):
        row = (row or [])[:width]
        matrix[i, : len(row)] = row
    return matrix


def query_images(queries: pl.DataFrame, direction: str) -> pl.DataFrame:
    """The queries of a direction, in the order `query_ranks` scores them, with the image each one is about:
    text_to_image, one per article (its true image); image_to_text, one per image (the first article's source)."""
    if direction == "text_to_image":
        return queries.select("article_id", "image_id", "source")
    return queries.group_by("image_id", maintain_order=True).agg(pl.col("source").first())


def query_ranks(queries: pl.DataFrame, rankings: pl.DataFrame, k: int, direction: str = "text_to_image",
                ties: str = "id", image_hashes: pl.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-query 1-based ranks of the truth (0 = absent) and each query's source, in an order set by `queries` alone
    (so two backbones' arrays are aligned by query).

    text_to_image: each query article's truth is its image. image_to_text: each image that belongs to a query
    article is a query, and any article published with it is a hit. A query with no ranking is a miss.
    `ties` other than `id` re-ranks text_to_image truths among their byte-identical duplicates, found by
    `image_hashes` (image_id, image_hash of every candidate)."""
    joined = query_images(queries, direction).join(rankings, on=DIRECTIONS[direction][1], how="left",
                                                   maintain_order="left")
    if direction == "text_to_image":
        ranked = _padded(joined["image_ids"].to_list(), k)
        if ties != "id":
            return tied_ranks(ranked, joined["image_id"].to_numpy(), image_hashes, ties), joined["source"].to_numpy()
    else:  # map ranked articles to their images: a hit is any article whose image is the query image
        image_of = dict(zip(queries["article_id"], queries["image_id"]))
        ranked = _padded([[image_of.get(a) for a in row] if row else None for row in joined["article_ids"].to_list()],
                         k)
    return ranks_of_truth(ranked, joined["image_id"].to_numpy()), joined["source"].to_numpy()


def tied_ranks(ranked: np.ndarray, truth: np.ndarray, image_hashes: pl.DataFrame, ties: str) -> np.ndarray:
    """Ranks with the truth placed first (`optimistic`) or last (`pessimistic`) among its exact duplicates.

    Byte-identical images have identical embeddings, so they sit side by side in a ranking (in id order). The
    truth's group starts where its first member is ranked; pessimistic adds the group's other members, and a
    group that runs past the last ranked slot is a miss (the truth may be ranked after it)."""
    hash_of = dict(zip(image_hashes["image_id"], image_hashes["image_hash"]))
    size_of = dict(image_hashes["image_hash"].value_counts().iter_rows())
    ranked_hashes = np.vectorize(lambda i: hash_of.get(i) if i is not None else None, otypes=[object])(ranked)
    truth_hashes = np.array([hash_of.get(t) for t in truth], dtype=object)
    same = (ranked_hashes == truth_hashes[:, None]) & np.not_equal(truth_hashes, None)[:, None]
    first = np.where(same.any(axis=1), same.argmax(axis=1) + 1, 0)
    if ties == "optimistic":
        return first
    last = first + np.array([size_of.get(h, 1) for h in truth_hashes]) - 1
    return np.where((first > 0) & (last <= ranked.shape[1]), last, 0)


def score_rankings(queries: pl.DataFrame, rankings: pl.DataFrame, k: int,
                   direction: str = "text_to_image") -> list[dict]:
    """Rows of metrics for one direction: source `all`, then one per source."""
    ranks, sources = query_ranks(queries, rankings, k, direction)
    rows = [{"source": "all", **scores(ranks, k)}]
    rows += [{"source": s, **scores(ranks[sources == s], k)} for s in sorted(set(sources))]
    return [{**row, "direction": direction} for row in rows]


def counts(queries: pl.DataFrame, direction: str, unusable: pl.Series | None = None) -> dict[str, int]:
    """Queries per source (and `all`) of a direction; with `unusable` image ids, only those whose image is one."""
    frame = query_images(queries, direction)
    if unusable is not None:
        frame = frame.filter(pl.col("image_id").is_in(unusable.implode()))
    return {"all": len(frame), **dict(frame["source"].value_counts().iter_rows())}


def duplicate_truths(queries: pl.DataFrame, image_hashes: pl.DataFrame) -> int:
    """Queries whose true image has a byte-identical copy under another id among the candidates: an exact tie."""
    sizes = image_hashes.group_by("image_hash").len("copies")
    truths = queries.join(image_hashes, on="image_id").join(sizes, on="image_hash")
    return int((truths["copies"] > 1).sum())


def csv_columns(k: int) -> list[str]:
    """metrics.csv: the scores with their intervals (`bootstrap.ci_columns`), then how many queries were sampled
    and how many of the scored ones could not be found because their image failed to encode (scored as misses)."""
    return [*ci_columns(k), "n_sampled", "n_unscoreable"]


def run(cfg: JobConfig) -> dict:
    out = cfg.output
    # sorted: the bootstrap resamples by position, so its intervals must not depend on the order of the files
    queries = pl.read_parquet(parquet_files(cfg.query_texts, "query texts"),
                              columns=["article_id", "image_id", "source"]).sort("article_id")
    sampled = pl.read_parquet(parquet_files(out / "prepared" / "queries", "prepared queries"),
                              columns=["article_id", "image_id", "source"])
    image_hashes = (pl.read_parquet(out / "prepared" / "candidates.parquet")
                    .filter("candidate").select("image_id", "image_hash"))
    rejects = read_rejects(out)
    failed = rejects.filter((pl.col("kind") == "image") & pl.col("stage").str.starts_with("encode"))["id"]
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    rows, paired, knn = [], [], []
    for direction in cfg.eval.directions:
        ranks, sources = {}, None
        for backbone in [*cfg.backbones, *cfg.fusion]:
            rankings = pl.read_parquet(out / "rankings" / f"{rankings_stem(backbone, direction)}.parquet")
            ranks[backbone], sources = query_ranks(queries, rankings, cfg.eval.k, direction, cfg.eval.ties,
                                                   image_hashes)
            entry = stages.get(knn_entry(backbone, direction), {})
            # an approximate index reports its recall against exact search, so nobody trusts it blindly
            knn.append({"backbone": backbone, "direction": direction, "index": entry.get("index"),
                        "recall_at_k_vs_exact": entry.get("recall_at_k"),
                        "short_lines": entry.get("short_lines", 0), "short_reason": entry.get("short_reason")})
        n_sampled, n_unscoreable = counts(sampled, direction), counts(queries, direction, failed)
        rows += [{**row, "n_sampled": n_sampled.get(row["source"], 0),
                  "n_unscoreable": n_unscoreable.get(row["source"], 0)}
                 for row in ci_rows(ranks, sources, cfg.eval.k, direction, b=cfg.eval.bootstrap, seed=cfg.eval.seed)]
        paired += paired_rows(ranks, cfg.eval.k, b=cfg.eval.bootstrap, seed=cfg.eval.seed, direction=direction)
    frame = pl.DataFrame(rows).select(csv_columns(cfg.eval.k))
    results = [_clip_benchmark_result(cfg, backbone, rows) for backbone in [*cfg.backbones, *cfg.fusion]]
    csv_path = write_text(out / "metrics.csv", frame.write_csv())
    ties = {"policy": cfg.eval.ties, "duplicate_truths": duplicate_truths(queries, image_hashes)}
    json_path = write_text(out / "metrics.json", json.dumps(
        {"k": cfg.eval.k, "bootstrap": cfg.eval.bootstrap, "metrics": metric_names(cfg.eval.k), "ties": ties,
         "rows": rows, "paired": paired, "knn": knn}, indent=2))
    return record_stage(out, "evaluate", [csv_path, json_path, *results], rows=len(rows), **ties)


def _clip_benchmark_result(cfg: JobConfig, backbone: str, rows: list[dict]) -> Path:
    """`results/<slug>.json` in the style of CLIP_benchmark: one file per backbone run, the overall metrics."""
    metrics = {}
    for row in rows:
        if row["backbone"] == backbone and row["source"] == "all":
            prefix = "text_retrieval" if row["direction"] == "image_to_text" else "image_retrieval"
            metrics.update({f"{prefix}_{key.replace('@', '_at_')}": row[key] for key in metric_names(cfg.eval.k)})
    pretrained = "openai" if backbone in OPENAI_NAMES else "newsclip"
    result = {"dataset": cfg.name, "model": backbone, "pretrained": pretrained, "task": "zeroshot_retrieval",
              "language": "en", "k": cfg.eval.k, "metrics": metrics}
    return write_text(cfg.output / "results" / f"{slug(backbone)}.json", json.dumps(result, indent=2))
