"""`report.md`: the metrics tables with the paper's numbers beside ours, paired comparisons, and what was rejected."""

from __future__ import annotations

import json

from newsclip.config import JobConfig
from newsclip.names import DIRECTIONS, encode_entry
from newsclip.report.data import metric_keys, read_training
from newsclip.report.notes import (
    INTERVALS,
    approximate_note,
    evaluation_notes,
    paired_note,
    scope_sentence,
    training_note,
)
from newsclip.retrieval.metrics import metric_label
from newsclip.retrieval.paper import paper_scores
from newsclip.runtime.rejects import rejects_summary
from newsclip.runtime.store import read_manifest


def _row(label: str, n: int | str, values: dict, keys: list[str]) -> str:
    """A table row: the label, n, and each metric to 3 decimals (a dash where `values` lacks it)."""
    cells = (f"{values[key]:.3f}" if key in values else "–" for key in keys)
    return "| " + " | ".join([label, str(n), *cells]) + " |"


def metrics_table(rows: list[dict], k: int, with_paper: bool = True) -> str:
    """Our rows (named in their `backbone` column), the paper's row under each backbone that has one."""
    keys = metric_keys(rows, k)
    header = ["backbone", "n", *[metric_label(key, k) for key in keys]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(_row(row["backbone"], row["n"], row, keys))
        paper = paper_scores(row["backbone"]) if with_paper else None
        if paper:
            lines.append(_row(f"{row['backbone']} (paper)", 2000, paper, keys))
    return "\n".join(lines)


def paired_table(paired: list[dict]) -> str:
    """One row per pair of backbones: the difference, its interval, the Holm p-value and the decision."""
    lines = ["| A | B | A − B | 95% interval | p (Holm) | decision |", "|---|---|---|---|---|---|"]
    for p in paired:
        p_holm = f"{p['p_holm']:.3f}" if "p_holm" in p else "–"  # metrics.json of an evaluate from before Holm
        lines.append(f"| {p['a']} | {p['b']} | {p['difference']:+.4f} | [{p['lo']:+.4f}, {p['hi']:+.4f}] | "
                     f"{p_holm} | {p['decision']} |")
    return "\n".join(lines)


def _per_source(cfg: JobConfig, rows: list[dict], k: int) -> list[str]:
    """A table per backbone (fusions last) with a row per article source."""
    lines = ["", "## Per source (text to image)", ""]
    for backbone in [*cfg.backbones, *cfg.fusion]:
        per_source = [{**r, "backbone": r["source"]} for r in rows
                      if r["backbone"] == backbone and r["source"] != "all"]
        lines += [f"### {backbone}", "", metrics_table(per_source, k, with_paper=False), ""]
    return lines


def _rejects(cfg: JobConfig, prep: dict) -> list[str]:
    """What prepare read and kept, and the rejected rows per stage and reason."""
    rejects = rejects_summary(cfg.output).select("stage", "reason", "rows")
    lines = ["## Rejected rows", "", f"{prep['articles_in']} articles and {prep['images_in']} images in; "
             f"{prep['usable_pairs']} usable article-image pairs.", ""]
    if not len(rejects):
        return [*lines, "None."]
    table = [f"| {stage} | {reason} | {n} |" for stage, reason, n in rejects.iter_rows()]
    return [*lines, "| stage | reason | rows |", "|---|---|---|", *table]


def _models(cfg: JobConfig, stages: dict) -> list[str]:
    """Each backbone as the encode stage loaded it: clip or open_clip, its preprocessing, tokenizer and texts."""
    described = [(b, stages.get(encode_entry(b, "images"), {}).get("model")) for b in cfg.backbones]
    if not any(model for _, model in described):
        return []
    return ["", "## Backbones", "", *[f"- {b}: {model}" for b, model in described if model]]


def render_markdown(cfg: JobConfig) -> str:
    """The whole of report.md; backbones keep their full names (the page shortens checkpoint paths)."""
    metrics = json.loads(cfg.layout.metrics_json.read_text())
    stages = read_manifest(cfg.output)["stages"]
    k = metrics["k"]
    rows = [r for r in metrics["rows"] if r["direction"] == "text_to_image"]
    overall = [r for r in rows if r["source"] == "all"]
    reverse = [r for r in metrics["rows"] if r["direction"] == "image_to_text" and r["source"] == "all"]
    lines = [f"# newsclip report: {cfg.name}", "",
             f"{scope_sentence(metrics, stages)} Paper rows: Zhang et al., MediaEval 2022 (2,000 sampled pairs). "
             f"Intervals (in metrics.csv and report.html): {INTERVALS}.", ""]
    lines += [f"**{kind}:** {text}.\n" for kind, text in evaluation_notes(metrics, stages["prepare"])]
    lines += ["## All sources", "", metrics_table(overall, k), ""]
    if reverse:
        lines += ["## Image to text (which article is this image for)", "", metrics_table(reverse, k, with_paper=False),
                  ""]
    lines += [f"- {approximate_note(x, k)}" for x in metrics.get("knn", []) if x["recall_at_k_vs_exact"] is not None]
    paired, note = metrics.get("paired", []), True
    for direction in DIRECTIONS:  # one Holm family across the directions: the note once, before the first table
        pairs = [p for p in paired if p["direction"] == direction]
        if pairs:
            lines += ["", f"## Paired comparisons ({direction.replace('_', ' ')})", ""]
            lines += [paired_note(paired), "", paired_table(pairs)] if note else [paired_table(pairs)]
            note = False
    trained = [(b, losses) for b in cfg.backbones if (losses := read_training(b))]
    if trained:
        lines += ["", "## Fine-tuning", "", *[f"- {training_note(b, losses)} The curve is in report.html."
                                                for b, losses in trained]]
    lines += _models(cfg, stages)
    lines += _per_source(cfg, rows, k)
    lines += _rejects(cfg, stages["prepare"])
    return "\n".join(lines) + "\n"
