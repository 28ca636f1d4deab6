"""report stage: `report.md` with the metrics table, the paper's numbers beside ours, and what was rejected."""

from __future__ import annotations

import json

from newsclip.config import JobConfig
from newsclip.report.html import INTERVALS, evaluation_notes, metric_keys, paired_note, scope_sentence
from newsclip.retrieval.metrics import metric_label
from newsclip.retrieval.paper import paper_scores
from newsclip.runtime.rejects import rejects_summary
from newsclip.runtime.store import record_stage, write_text

__all__ = ["run"]  # the stage; everything else here is its own business


def _row(label: str, n: int | str, values: dict, keys: list[str]) -> str:
    cells = (f"{values[key]:.3f}" if key in values else "–" for key in keys)
    return "| " + " | ".join([label, str(n), *cells]) + " |"


def metrics_table(rows: list[dict], k: int, with_paper: bool = True) -> str:
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
    lines = ["| A | B | A − B | 95% interval | p (Holm) | decision |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['a']} | {p['b']} | {p['difference']:+.4f} | [{p['lo']:+.4f}, {p['hi']:+.4f}] | "
              f"{p['p_holm']:.3f} | {p['decision']} |" for p in paired]
    return "\n".join(lines)


def render(cfg: JobConfig) -> str:
    out = cfg.output
    metrics = json.loads((out / "metrics.json").read_text())
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    prep = stages["prepare"]
    rows = [r for r in metrics["rows"] if r["direction"] == "text_to_image"]
    overall = [r for r in rows if r["source"] == "all"]
    reverse = [r for r in metrics["rows"] if r["direction"] == "image_to_text" and r["source"] == "all"]
    lines = [f"# newsclip report: {cfg.name}", "",
             f"{scope_sentence(metrics, stages)} Paper rows: Zhang et al., MediaEval 2022 (2,000 sampled pairs). "
             f"Intervals (in metrics.csv and report.html): {INTERVALS}.", ""]
    lines += [f"**{kind}:** {text}.\n" for kind, text in evaluation_notes(metrics, prep)]
    lines += ["## All sources", "", metrics_table(overall, metrics["k"]), ""]
    if reverse:
        lines += ["## Image to text (which article is this image for)", "",
                  metrics_table(reverse, metrics["k"], with_paper=False), ""]
    approximate = [k for k in metrics.get("knn", []) if k["recall_at_k_vs_exact"] is not None]
    for k in approximate:
        lines.append(f"- `{k['index']}` index for {k['backbone']} {k['direction']}: recall@{metrics['k']} "
                     f"{k['recall_at_k_vs_exact']:.4f} against exact search on a sample of queries")
    paired = [p for p in metrics.get("paired", []) if p["direction"] == "text_to_image"]
    if paired:
        lines += ["", "## Paired comparisons (text to image)", "", paired_note(paired), "", paired_table(paired)]
    lines += ["", "## Per source (text to image)", ""]
    for backbone in [*cfg.backbones, *cfg.fusion]:
        per_source = [{**r, "backbone": r["source"]} for r in rows
                      if r["backbone"] == backbone and r["source"] != "all"]
        lines += [f"### {backbone}", "", metrics_table(per_source, metrics["k"], with_paper=False), ""]
    rejects = rejects_summary(out).select("stage", "reason", "rows")
    lines += ["## Rejected rows", "", f"{prep['articles_in']} articles and {prep['images_in']} images in; "
              f"{prep['usable_pairs']} usable article-image pairs.", ""]
    if len(rejects):
        lines += ["| stage | reason | rows |", "|---|---|---|"]
        lines += [f"| {s} | {r} | {n} |" for s, r, n in rejects.iter_rows()]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def run(cfg: JobConfig) -> dict:
    from newsclip.report.html import write_html

    path = write_text(cfg.output / "report.md", render(cfg))
    return record_stage(cfg.output, "report", [path, write_html(cfg.output, cfg)])
