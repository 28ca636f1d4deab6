"""`report.html`: one self-contained page (inline SVG plots, base64 thumbnails, no scripts, no external URLs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from newsclip.names import is_fusion
from newsclip.report.data import ReportData, metric_keys, read_queries, read_report_data, read_translated
from newsclip.report.escape import esc
from newsclip.report.examples import examples_html
from newsclip.report.notes import (
    INTERVALS,
    approximate_note,
    evaluation_notes,
    paired_note,
    scope_sentence,
    training_note,
)
from newsclip.report.svg import (
    cost_quality_svg,
    mrr_by_source_svg,
    recall_curves_svg,
    series_colors,
    training_curve_svg,
)
from newsclip.retrieval.metrics import metric_label
from newsclip.retrieval.paper import paper_scores
from newsclip.runtime.layout import Layout
from newsclip.runtime.rejects import rejects_summary
from newsclip.runtime.store import write_text

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.name,th.name{text-align:left;white-space:nowrap}
tr.paper td{color:#777;font-style:italic;background:#fafafa}
.ci{display:block;color:#888;font-size:11px;white-space:nowrap}
.best{font-weight:bold}.note{color:#555;font-size:13px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
figure{margin:8px 0 20px}figcaption{color:#555;font-size:13px}
.example{border:1px solid #ddd;border-radius:6px;padding:12px;margin:12px 0}
.example h3{margin:0 0 4px;font-size:1.05em}.meta{color:#666;font-size:12px}
.body{font-size:13px;color:#333;margin:6px 0;white-space:pre-wrap}
.thumbs{display:flex;gap:10px;flex-wrap:wrap;margin-top:8px}
.thumb{width:170px;text-align:center;font-size:12px;color:#555}
.thumb img,.thumb .missing{border:3px solid #ccc;border-radius:4px;max-width:160px;max-height:160px}
.thumb .missing{display:inline-block;width:154px;height:100px;line-height:100px;background:#eee}
.thumb.hit img,.thumb.hit .missing{border-color:#2ca02c}.thumb.hit{color:#1a7f1a;font-weight:bold}
.thumb.truth img{border-color:#2ca02c;border-style:dashed}
.decision-yes{color:#1a7f1a;font-weight:bold}
"""


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def checkpoints_note(labels: dict[str, str]) -> str:
    """Which file each shortened checkpoint label stands for (the tables and plots show the short label)."""
    paths = {label: name for name, label in labels.items() if label != name and not is_fusion(name)}
    if not paths:
        return ""
    items = "; ".join(f"<code>{esc(label)}</code>: {esc(name)}" for label, name in paths.items())
    return f'<p class="note">Checkpoint files: {items}.</p>'


# ---------------------------------------------------------------- tables

def _header(columns: Sequence[str], names: Sequence[str] = ()) -> str:
    """A table's header row; the `names` columns hold names, left-aligned like their cells."""
    return "<tr>" + "".join(f'<th class="name">{esc(c)}</th>' if c in names else f"<th>{esc(c)}</th>"
                            for c in columns) + "</tr>"


def _value_cell(row: dict, key: str, best: bool) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    ci = f'<span class="ci">[{_fmt(lo)}, {_fmt(hi)}]</span>' if lo is not None and hi is not None else ""
    css = ' class="best"' if best else ""
    return f"<td{css}>{_fmt(row.get(key))}{ci}</td>"


def _paper_row(name: str, row: dict, paper: dict, keys: list[str]) -> str:
    """The paper's numbers under ours (on 2,000 pairs); the tooltip says whether each is inside our interval."""
    inside = [key for key in keys if key in paper and row.get(f"{key}_lo") is not None
              and row[f"{key}_lo"] <= paper[key] <= row[f"{key}_hi"]]
    cells = "".join(f'<td title="{"inside" if key in inside else "outside"} our 95% interval">'
                    f'{_fmt(paper[key])}</td>' if key in paper else "<td>–</td>" for key in keys)
    return f'<tr class="paper"><td class="name">{esc(name)} (paper)</td><td>2000</td>{cells}</tr>'


def metrics_table_html(rows: list[dict], k: int, with_paper: bool = True, label: str = "backbone",
                       colors: dict[str, str] | None = None) -> str:
    """Our rows with their 95% intervals (when present), the paper's row under each backbone that has one.

    `label` names the row column (`backbone`, or `source` for one backbone's rows per source); the best value of
    each column is bold when rows are backbones."""
    keys = metric_keys(rows, k)
    best = {key: max((r[key] for r in rows if r.get(key) is not None), default=None) if label == "backbone" else None
            for key in keys}
    lines = ["<table>", _header([label, "n", *[metric_label(key, k) for key in keys]], names=[label])]
    for row in rows:
        name = row[label]
        swatch = f'<span class="swatch" style="background:{colors[name]}"></span>' if colors and name in colors else ""
        cells = "".join(_value_cell(row, key, len(rows) > 1 and row.get(key) == best[key]) for key in keys)
        lines.append(f'<tr><td class="name">{swatch}{esc(name)}</td><td>{esc(row["n"])}</td>{cells}</tr>')
        paper = paper_scores(name) if with_paper else None
        if paper:
            lines.append(_paper_row(name, row, paper, keys))
    lines.append("</table>")
    return "\n".join(lines)


def paired_table_html(paired: list[dict]) -> str:
    """One row per pair of backbones: the difference, its interval, the Holm p-value and the decision (green)."""
    lines = ["<table>", _header(["A", "B", "metric", "A − B", "95% interval", "share of resamples A > B", "p (Holm)",
                                 "decision"], names=["A", "B", "decision"])]
    for p in paired:
        decided = p["decision"] != "no significant difference"
        lines.append(f'<tr><td class="name">{esc(p["a"])}</td><td class="name">{esc(p["b"])}</td>'
                     f'<td>{esc(p.get("metric", "mrr"))}</td><td>{p["difference"]:+.4f}</td>'
                     f'<td>[{p["lo"]:+.4f}, {p["hi"]:+.4f}]</td><td>{p["share_a_better"]:.3f}</td>'
                     f'<td>{_fmt(p.get("p_holm"))}</td>'
                     f'<td class="name{" decision-yes" if decided else ""}">{esc(p["decision"])}</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


def cost_table_html(costs: list[dict], quality: dict[str, dict]) -> str:
    """Encode rows, seconds, throughput and GPU memory per backbone, beside its MRR."""
    lines = ["<table>", _header(["backbone", "images", "image encode s", "images/s", "texts", "text encode s",
                                 "texts/s", "GPU memory GiB", "MRR"], names=["backbone"])]
    for c in costs:
        q = quality.get(c["backbone"], {})
        model = f'<br><small>{esc(c["model"])}</small>' if c.get("model") else ""
        lines.append(f'<tr><td class="name">{esc(c["backbone"])}{model}</td><td>{esc(c["images"] or "–")}</td>'
                     f'<td>{_fmt(c["image_seconds"], 1)}</td><td>{_fmt(c["images_per_s"], 1)}</td>'
                     f'<td>{esc(c["texts"] or "–")}</td><td>{_fmt(c["text_seconds"], 1)}</td>'
                     f'<td>{_fmt(c["texts_per_s"], 1)}</td><td>{_fmt(c["gpu_gib"], 2)}</td>'
                     f'<td>{_fmt(q.get("mrr"))}</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


# ---------------------------------------------------------------- the page's sections, in page order

def _head(data: ReportData) -> list[str]:
    """The document head, the title, and the notes that qualify every number below."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>newsclip report: {esc(data.name)}</title><style>{CSS}</style></head><body>",
           f"<h1>newsclip report: {esc(data.name)}</h1>"]
    summary = esc(scope_sentence(data.metrics, data.stages)) + " Paper rows (grey): Zhang et al., MediaEval 2022."
    if any("mrr_lo" in r for r in data.overall):
        summary += f" Brackets: {esc(INTERVALS)}."
    out.append(f'<p class="note">{summary}</p>')
    notes = evaluation_notes(data.metrics, data.prep, data.labels)
    out += [f'<p class="note"><b>{kind}:</b> {esc(text)}.</p>' for kind, text in notes]
    out.append(checkpoints_note(data.labels))
    return out


def _quality(data: ReportData, colors: dict[str, str]) -> list[str]:
    """The overall table, the Recall@K curves, MRR per source as bars and as a table per backbone."""
    overall = data.overall
    out = ["<h2>All backbones (text to image)</h2>", metrics_table_html(overall, data.k, colors=colors)]
    if not overall:
        return out
    paper = ", the paper's (dashed)" if any(paper_scores(r["backbone"]) for r in overall) else ""
    out += ["<h2>Recall@K</h2>", "<figure>", recall_curves_svg(overall, colors),
            f"<figcaption>Recall@K per backbone (solid; shaded: 95% interval){paper}.</figcaption>", "</figure>"]
    per_source = [r for r in data.t2i if r["source"] != "all"]
    out += ["<h2>MRR per source</h2>", "<figure>", mrr_by_source_svg(per_source or overall, data.backbones, colors),
            "<figcaption>MRR@k per article source (whiskers: 95% interval).</figcaption></figure>"]
    for backbone in data.backbones:
        rows = [r for r in per_source if r["backbone"] == backbone]
        if rows:
            out += [f"<h3>{esc(backbone)}</h3>", metrics_table_html(rows, data.k, with_paper=False, label="source")]
    return out


def _paired(data: ReportData) -> list[str]:
    """Both directions' comparisons (one Holm family, one note): text to image first, image to text below it."""
    if not data.paired and not data.paired_i2t:
        return []
    out = ["<h2>Paired comparisons</h2>", f'<p class="note">{esc(paired_note(data.paired + data.paired_i2t))}</p>']
    if data.paired:
        out.append(paired_table_html(data.paired))
    if data.paired_i2t:
        out += ["<h3>Image to text</h3>", paired_table_html(data.paired_i2t)]
    return out


def _training(data: ReportData) -> list[str]:
    """The training curve of each fine-tuned backbone (`newsclip finetune`)."""
    out = []
    for label, losses in data.training.items():
        out += [f"<h2>Fine-tuning: {esc(label)}</h2>", f'<p class="note">{esc(training_note(label, losses))}</p>',
                "<figure>", training_curve_svg(losses),
                "<figcaption>Contrastive loss per optimizer step (train) and on the validation split.</figcaption>",
                "</figure>"]
    return out


def _cost(data: ReportData, colors: dict[str, str]) -> list[str]:
    if not data.costs:
        return []
    return ["<h2>Cost against quality</h2>", cost_table_html(data.costs, data.quality), "<figure>",
            cost_quality_svg(data.costs, data.quality, colors),
            "<figcaption>Encode seconds per backbone (a fusion: the sum of its members) against MRR.</figcaption>",
            "</figure>"]


def _image_to_text(data: ReportData, colors: dict[str, str]) -> list[str]:
    if not data.i2t:
        return []
    rows = [r for r in data.i2t if r["source"] == "all"]
    return ["<h2>Image to text (which article is this image for)</h2>",
            metrics_table_html(rows, data.k, with_paper=False, colors=colors)]


def _approximate_search(data: ReportData) -> list[str]:
    """How close each approximate index came to exact search (nothing when every search was exact)."""
    knn = [x for x in data.metrics.get("knn", []) if x.get("recall_at_k_vs_exact") is not None]
    if not knn:
        return []
    return ["<ul>" + "".join(f"<li>{esc(approximate_note(x, data.k).replace('`', ''))}</li>" for x in knn) + "</ul>"]


def _examples(data: ReportData, examples: int, example_backbone: str | None) -> list[str]:
    """Example articles of `example_backbone` (a full name), by default the backbone with the best MRR."""
    if not data.overall or examples <= 0:
        return []
    by_label = {label: name for name, label in data.labels.items()}
    shown = example_backbone or by_label[max(data.overall, key=lambda r: (r["mrr"], r["backbone"]))["backbone"]]
    out = [f"<h2>Examples ({esc(data.labels.get(shown, shown))})</h2>",
           ('<p class="note">Each article with its top-5 images and their scores (cosine similarity; for a '
            "fusion, the fused score); the correct one has a green frame (dashed: shown separately when it is "
            "not in the top 5).</p>")]
    try:
        queries = read_queries(data.output_dir)
    except FileNotFoundError:
        return [*out, '<p class="note">No prepared queries.</p>']
    return [*out, examples_html(data.output_dir, shown, queries, data.images_spec, examples,
                                read_translated(data.output_dir))]


def _rejects(data: ReportData) -> list[str]:
    """What prepare read and kept, and the rejected rows per stage and reason."""
    rejects = rejects_summary(data.output_dir).select("stage", "reason", "rows")
    parts = ["<h2>Rejected rows</h2>"]
    prep = data.prep
    if prep:
        parts.append(f'<p class="note">{esc(prep.get("articles_in"))} articles and {esc(prep.get("images_in"))} '
                     f'images in; {esc(prep.get("usable_pairs"))} usable article-image pairs.</p>')
    if len(rejects):
        parts.append("<table>" + _header(["stage", "reason", "rows"], names=["stage", "reason"])
                     + "".join(f'<tr><td class="name">{esc(s)}</td><td class="name">{esc(r)}</td><td>{esc(n)}</td></tr>'
                               for s, r, n in rejects.iter_rows()) + "</table>")
    else:
        parts.append("<p>None.</p>")
    return parts


def render_html(output_dir: Path, cfg=None, examples: int = 5, example_backbone: str | None = None) -> str:
    """The whole report as one HTML string. `cfg` (a JobConfig or anything with `name`, `backbones`,
    `input.images`) is optional: without it the backbones come from metrics.json in its order."""
    data = read_report_data(output_dir, cfg)
    colors = series_colors(data.backbones)  # a backbone is its label from here on: tables, plots and colours
    out = [*_head(data), *_quality(data, colors), *_paired(data), *_training(data), *_cost(data, colors),
           *_image_to_text(data, colors), *_approximate_search(data), *_examples(data, examples, example_backbone),
           *_rejects(data), "</body></html>"]
    return "\n".join(out) + "\n"


def write_html(output_dir: Path, cfg=None, **kwargs) -> Path:
    """Render and write `report.html` atomically."""
    return write_text(Layout(Path(output_dir)).report_html, render_html(output_dir, cfg, **kwargs))
