"""evaluate stage: score each backbone's rankings (MRR@k, Recall@K) per direction, overall and per source,
with seeded bootstrap 95% intervals and paired comparisons between backbones."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from newsclip.config import JobConfig
from newsclip.names import knn_entry, rankings_stem, slug
from newsclip.retrieval.backbones import OPENAI_NAMES
from newsclip.retrieval.bootstrap import ci_columns, ci_rows, decide_as_one_family, paired_rows
from newsclip.retrieval.metrics import metric_names
from newsclip.retrieval.ranks import counts, duplicate_truths, query_ranks
from newsclip.retrieval.trained import excluded_counts, is_checkpoint_file, leave_out_trained, trained_on
from newsclip.runtime.rejects import read_rejects
from newsclip.runtime.stage import Stage
from newsclip.runtime.store import parquet_files, read_manifest, record_stage, write_text

__all__ = ["run"]  # the stage; everything else here is its own business


def csv_columns(k: int) -> list[str]:
    """metrics.csv: the scores with their intervals (`bootstrap.ci_columns`), then how many queries were sampled,
    how many of the scored ones could not be found because their image failed to encode (scored as misses), and
    how many were left out because a fine-tuned backbone of the job trained or validated on them."""
    return [*ci_columns(k), "n_sampled", "n_unscoreable", "n_excluded_trained"]


def _run(cfg: JobConfig) -> dict:
    out, layout = cfg.output, cfg.layout
    # sorted: the bootstrap resamples by position, so its intervals must not depend on the order of the files
    queries = pl.read_parquet(parquet_files(cfg.query_texts, "query texts"),
                              columns=["article_id", "image_id", "source"]).sort("article_id")
    sampled = pl.read_parquet(parquet_files(layout.prepared.queries, "prepared queries"),
                              columns=["article_id", "image_id", "source"])
    candidates = pl.read_parquet(layout.prepared.candidates, columns=["image_id", "image_hash", "candidate"])
    image_hashes = candidates.filter("candidate").select("image_id", "image_hash")
    # a fine-tuned checkpoint is scored only on what it never saw, and so is every other backbone (paired)
    scored, trained = leave_out_trained(queries, candidates, trained_on(_checkpoints(cfg)))
    rejects = read_rejects(out)
    failed = rejects.filter((pl.col("kind") == "image") & pl.col("stage").str.starts_with("encode"))["id"]
    stages = read_manifest(out)["stages"]
    rows, paired, knn = [], [], []
    for direction in cfg.eval.directions:
        ranks, sources = {}, None
        for backbone in [*cfg.backbones, *cfg.fusion]:
            rankings = layout.rankings_parquet(rankings_stem(backbone, direction))  # read a batch at a time
            ranks[backbone], sources = query_ranks(scored, rankings, cfg.eval.k, direction, cfg.eval.ties,
                                                   image_hashes)
            entry = stages.get(knn_entry(backbone, direction), {})
            # an approximate index reports its recall against exact search, so nobody trusts it blindly
            knn.append({"backbone": backbone, "direction": direction, "index": entry.get("index"),
                        "engine": entry.get("engine"), "recall_at_k_vs_exact": entry.get("recall_at_k"),
                        "recall_queries": entry.get("recall_queries"), "knob": entry.get("knob"),
                        "target_recall": (entry.get("tuning") or {}).get("target_recall"),
                        "short_lines": entry.get("short_lines", 0), "short_reason": entry.get("short_reason")})
        n_sampled, n_unscoreable = counts(sampled, direction), counts(scored, direction, failed)
        n_trained = excluded_counts(queries, scored, direction)
        rows += [{**row, "n_sampled": n_sampled.get(row["source"], 0),
                  "n_unscoreable": n_unscoreable.get(row["source"], 0),
                  "n_excluded_trained": n_trained.get(row["source"], 0)}
                 for row in ci_rows(ranks, sources, cfg.eval.k, direction, b=cfg.eval.bootstrap, seed=cfg.eval.seed)]
        paired += paired_rows(ranks, cfg.eval.k, b=cfg.eval.bootstrap, seed=cfg.eval.seed, direction=direction)
    paired = decide_as_one_family(paired)  # every verdict the report prints, both directions: one Holm family
    frame = pl.DataFrame(rows).select(csv_columns(cfg.eval.k))
    results = [_clip_benchmark_result(cfg, backbone, rows) for backbone in [*cfg.backbones, *cfg.fusion]]
    csv_path = write_text(layout.metrics_csv, frame.write_csv())
    ties = {"policy": cfg.eval.ties, "duplicate_truths": duplicate_truths(scored, image_hashes)}
    json_path = write_text(layout.metrics_json, json.dumps(
        {"k": cfg.eval.k, "bootstrap": cfg.eval.bootstrap, "metrics": metric_names(cfg.eval.k), "ties": ties,
         "rows": rows, "paired": paired, "knn": knn, "trained": trained}, indent=2))
    return record_stage(out, "evaluate", [csv_path, json_path, *results], rows=len(rows), **ties)


def _clip_benchmark_result(cfg: JobConfig, backbone: str, rows: list[dict]) -> Path:
    """`results/<slug>.json` in the style of CLIP_benchmark: one file per backbone run, the overall metrics."""
    metrics = {}
    for row in rows:
        if row["backbone"] == backbone and row["source"] == "all":
            prefix = "text_retrieval" if row["direction"] == "image_to_text" else "image_retrieval"
            metrics.update({f"{prefix}_{key.replace('@', '_at_')}": row[key] for key in metric_names(cfg.eval.k)})
    entry = cfg.backbone_options.get(backbone)
    tag = entry.pretrained if entry and entry.open_clip and not Path(entry.pretrained).expanduser().exists() else \
        backbone.split("/", 1)[1] if "/" in backbone and not Path(backbone).expanduser().exists() else None
    pretrained = "openai" if backbone in OPENAI_NAMES else tag or "newsclip"
    result = {"dataset": cfg.name, "model": backbone, "pretrained": pretrained, "task": "zeroshot_retrieval",
              "language": "en", "k": cfg.eval.k, "metrics": metrics}
    return write_text(cfg.layout.result(slug(backbone)), json.dumps(result, indent=2))


def _checkpoint_files(cfg: JobConfig) -> dict[str, str] | None:
    """The checkpoint files among the backbones as they are now (None: there are none): their training records decide
    the queries left out (the same weights saved with another record embed as before, and would not rerun encode)."""
    return {name: b.checkpoint_id for name, b in _checkpoints(cfg).items()} or None


def _checkpoints(cfg: JobConfig) -> dict:
    """The backbones that are weights files the job names (fine-tunes, maybe newsclip's own), resolved: the registry's
    names and open_clip's published tags are never resolved here, so evaluate needs none of their weights."""
    from newsclip.retrieval.backbones import BACKBONES

    def a_file(name: str) -> bool:
        entry = cfg.backbone_options.get(name)
        source = (entry.pretrained or entry.backbone) if entry else name
        return source not in BACKBONES and Path(source).expanduser().is_file()

    return {name: b for name in cfg.backbones if a_file(name) and is_checkpoint_file(b := cfg.resolved(name))}


run = Stage("evaluate", _run, external_inputs=_checkpoint_files)
