"""`report.html`: one self-contained file (inline SVG plots, base64 thumbnails, no scripts, no external URLs)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from newsclip.names import encode_entry, is_fusion, looks_like_path, parse_fusion_name, rankings_stem
from newsclip.retrieval.metrics import CUTOFFS, metric_label, metric_names
from newsclip.retrieval.paper import paper_scores

# Tableau 10: distinguishable for up to ten lines, and a colour-blind-friendlier order than matplotlib's default
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac"]
THUMB = 160  # thumbnail bounding box in pixels: five per row fit a 1000 px page
PLOT_W = 510  # the plot area's width in every chart; legends and labels get room beside it
CHAR_W = 6.5  # a generous average glyph width of the 11 px chart font, to size room for text without measuring it
BODY_CHARS = 700  # article body shown per example; the rest is cut (the full text is in prepared/queries)
GPU_MEMORY_KEYS = ("gpu_memory_bytes", "gpu_peak_memory_bytes", "gpu_memory_mb")  # manifest encode entry facts

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


def esc(value: object) -> str:
    """Escape anything for HTML text and attribute values (article text is untrusted input)."""
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def display_names(names: Sequence[str]) -> dict[str, str]:
    """Short labels for tables and plots: a checkpoint path shows as its file name, also inside a fusion name
    (`fusion:demo-tiny+/models/x.pt` -> `fusion:demo-tiny+x.pt`); names whose labels would coincide stay whole."""
    from newsclip.retrieval.backbones import BACKBONES

    def short(name: str) -> str:
        if name in BACKBONES or not looks_like_path(name) or Path(name).name in BACKBONES:
            return name  # a file called like a published backbone must not get that backbone's paper row
        return Path(name).name

    labels = {}
    for name in names:
        if is_fusion(name):
            labels[name] = f"{name.partition(':')[0]}:{'+'.join(short(m) for m in parse_fusion_name(name)[1])}"
        else:
            labels[name] = short(name)
    taken = list(labels.values())
    return {n: label if taken.count(label) == 1 else n for n, label in labels.items()}


def _relabel(rows: list[dict], labels: dict[str, str], *keys: str) -> list[dict]:
    return [{**row, **{key: labels.get(row[key], row[key]) for key in keys}} for row in rows]


def checkpoints_note(labels: dict[str, str]) -> str:
    """Which file each shortened checkpoint label stands for (the tables and plots show the short label)."""

    paths = {label: name for name, label in labels.items() if label != name and not is_fusion(name)}
    if not paths:
        return ""
    items = "; ".join(f"<code>{esc(label)}</code>: {esc(name)}" for label, name in paths.items())
    return f'<p class="note">Checkpoint files: {items}.</p>'


# ---------------------------------------------------------------- tables

def _value_cell(row: dict, key: str, best: bool) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    ci = f'<span class="ci">[{_fmt(lo)}, {_fmt(hi)}]</span>' if lo is not None and hi is not None else ""
    css = ' class="best"' if best else ""
    return f"<td{css}>{_fmt(row.get(key))}{ci}</td>"


def metrics_table_html(rows: list[dict], k: int, with_paper: bool = True, label: str = "backbone",
                       colors: dict[str, str] | None = None) -> str:
    """Our rows with their 95% intervals (when present), the paper's row under each backbone that has one.

    `label` names the row column (`backbone`, or `source` for one backbone's rows per source); the best value of
    each column is bold when rows are backbones."""
    keys = metric_keys(rows, k)
    header = [label, "n", *[metric_label(key, k) for key in keys]]
    best = {key: max((r[key] for r in rows if r.get(key) is not None), default=None) if label == "backbone" else None
            for key in keys}
    heads = [f'<th class="name">{esc(header[0])}</th>', *(f"<th>{esc(h)}</th>" for h in header[1:])]
    lines = ["<table>", "<tr>" + "".join(heads) + "</tr>"]
    for row in rows:
        name = row[label]
        swatch = f'<span class="swatch" style="background:{colors[name]}"></span>' if colors and name in colors else ""
        cells = "".join(_value_cell(row, key, len(rows) > 1 and row.get(key) == best[key]) for key in keys)
        lines.append(f'<tr><td class="name">{swatch}{esc(name)}</td><td>{esc(row["n"])}</td>{cells}</tr>')
        paper = paper_scores(name) if with_paper else None
        if paper:
            inside = [key for key in keys if key in paper and row.get(f"{key}_lo") is not None
                      and row[f"{key}_lo"] <= paper[key] <= row[f"{key}_hi"]]
            cells = "".join(f'<td title="{"inside" if key in inside else "outside"} our 95% interval">'
                            f'{_fmt(paper[key])}</td>' if key in paper else "<td>–</td>" for key in keys)
            lines.append(f'<tr class="paper"><td class="name">{esc(name)} (paper)</td><td>2000</td>{cells}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


def metric_keys(rows: list[dict], k: int) -> list[str]:
    """The metrics these rows hold, in table order (rows of an older run may lack the newer ones)."""
    return [m for m in metric_names(k) if any(m in r for r in rows)]


def paired_table_html(paired: list[dict]) -> str:
    lines = ["<table>", ('<tr><th class="name">A</th><th class="name">B</th><th>metric</th><th>A − B</th>'
                         "<th>95% interval</th><th>share of resamples A &gt; B</th><th>p (Holm)</th>"
                         '<th class="name">decision</th></tr>')]
    for p in paired:
        decided = p["decision"] != "no significant difference"
        lines.append(f'<tr><td class="name">{esc(p["a"])}</td><td class="name">{esc(p["b"])}</td>'
                     f'<td>{esc(p.get("metric", "mrr"))}</td><td>{p["difference"]:+.4f}</td>'
                     f'<td>[{p["lo"]:+.4f}, {p["hi"]:+.4f}]</td><td>{p["share_a_better"]:.3f}</td>'
                     f'<td>{_fmt(p.get("p_holm"))}</td>'
                     f'<td class="name{" decision-yes" if decided else ""}">{esc(p["decision"])}</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


# ---------------------------------------------------------------- SVG plots (hand-made: no plotting dependency)

def _ticks(vmax: float, count: int = 5) -> tuple[np.ndarray, float]:
    """Round tick values from 0 (steps of 1, 2, 2.5 or 5 times a power of ten) and the axis top they reach."""
    vmax = max(vmax, 1e-9)
    raw = vmax / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    top = math.ceil(vmax / step - 1e-9) * step
    return np.arange(0, top + step / 2, step), top


def _tick_label(v: float) -> str:
    return f"{v:.3g}"


def _legend_room(names: Sequence[str]) -> int:
    """Pixels right of the plot for a legend of `names`: 200, more when a name is long (a fusion of long names)."""
    return max(200, int(16 + 14 + CHAR_W * max((len(n) for n in names), default=0) + 8))


def _svg_open(width: int, height: int, label: str) -> str:
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{esc(label)}" style="font-family:inherit;font-size:11px">')


def _y_grid(values, py, left: float, pw: float, label=None) -> list[str]:
    """Horizontal grid lines across the plot, each labelled on the left (by `_tick_label` unless `label`)."""
    label = label or _tick_label
    return [f'<line x1="{left}" y1="{py(v):.1f}" x2="{left + pw}" y2="{py(v):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{label(v)}</text>' for v in values]


def _legend(names: Sequence[str], colors: dict[str, str], x: float, y: float, dashed_note: bool = False) -> str:
    parts = []
    for i, name in enumerate(names):
        yy = y + i * 16
        parts.append(f'<rect x="{x}" y="{yy - 8}" width="10" height="10" fill="{colors[name]}"/>'
                     f'<text x="{x + 14}" y="{yy + 1}">{esc(name)}</text>')
    if dashed_note:
        yy = y + len(names) * 16 + 4
        parts.append(f'<line x1="{x}" y1="{yy - 3}" x2="{x + 10}" y2="{yy - 3}" stroke="#666" stroke-dasharray="3,2"/>'
                     f'<text x="{x + 14}" y="{yy + 1}" fill="#666">paper</text>')
    return "".join(parts)


def recall_curves_svg(rows: list[dict], colors: dict[str, str], with_paper: bool = True) -> str:
    """Recall@K against K (log axis) per backbone; the paper's curve dashed in the same colour."""
    height, left, right, top, bottom = 340, 50, _legend_room([r["backbone"] for r in rows]), 15, 40
    width, pw, ph = left + PLOT_W + right, PLOT_W, height - top - bottom
    cutoffs = [c for c in CUTOFFS if all(f"recall@{c}" in r for r in rows)]
    lx0, lx1 = math.log(cutoffs[0]), math.log(cutoffs[-1]) if len(cutoffs) > 1 else math.log(cutoffs[0]) + 1

    def px(k: int) -> float:
        return left + (math.log(k) - lx0) / (lx1 - lx0) * pw

    def py(v: float) -> float:
        return top + (1 - v) * ph

    parts = [_svg_open(width, height, "Recall at K curves")]
    parts += _y_grid(np.linspace(0, 1, 6), py, left, pw, label=lambda v: f"{v:.1f}")
    for k in cutoffs:
        parts.append(f'<line x1="{px(k):.1f}" y1="{top}" x2="{px(k):.1f}" y2="{top + ph}" stroke="#eee"/>'
                     f'<text x="{px(k):.1f}" y="{top + ph + 16}" text-anchor="middle">{k}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
                 f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">K (log scale)</text>'
                 f'<text x="12" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {top + ph / 2})">'
                 f'Recall@K</text>')
    any_paper = False
    for row in rows:
        name, color = row["backbone"], colors[row["backbone"]]
        paper = paper_scores(name) if with_paper else None
        if paper:
            any_paper = True
            pts = " ".join(f"{px(k):.1f},{py(paper[f'recall@{k}']):.1f}" for k in cutoffs if f"recall@{k}" in paper)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.2" '
                         f'stroke-dasharray="4,3" opacity="0.8"/>')
        if all(row.get(f"recall@{k}_lo") is not None for k in cutoffs):  # the 95% band
            upper = [f"{px(k):.1f},{py(row[f'recall@{k}_hi']):.1f}" for k in cutoffs]
            lower = [f"{px(k):.1f},{py(row[f'recall@{k}_lo']):.1f}" for k in reversed(cutoffs)]
            parts.append(f'<polygon points="{" ".join(upper + lower)}" fill="{color}" opacity="0.12"/>')
        pts = " ".join(f"{px(k):.1f},{py(row[f'recall@{k}']):.1f}" for k in cutoffs)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for k in cutoffs:
            parts.append(f'<circle cx="{px(k):.1f}" cy="{py(row[f"recall@{k}"]):.1f}" r="3" fill="{color}">'
                         f'<title>{esc(name)} R@{k} = {row[f"recall@{k}"]:.3f}</title></circle>')
    parts.append(_legend([r["backbone"] for r in rows], colors, left + pw + 16, top + 10, any_paper))
    parts.append("</svg>")
    return "".join(parts)


def mrr_by_source_svg(rows: list[dict], backbones: list[str], colors: dict[str, str]) -> str:
    """Grouped bars: one group per source, one bar per backbone, 95% whiskers when present."""
    sources = sorted({r["source"] for r in rows if r["source"] != "all"}) or ["all"]
    value = {(r["backbone"], r["source"]): r for r in rows}
    yticks, ymax = _ticks(min(1.0, max([r.get("mrr_hi") or r["mrr"] for r in rows] + [0.05])))
    nb = len(backbones)
    height, left, right, top, bottom = 300, 50, _legend_room(backbones), 15, 40
    width, pw, ph = left + PLOT_W + right, PLOT_W, height - top - bottom
    group = pw / len(sources)
    bar = min(28.0, group * 0.8 / max(nb, 1))

    def py(v: float) -> float:
        return top + (1 - v / ymax) * ph

    parts = [_svg_open(width, height, "MRR per source")]
    parts += _y_grid(yticks, py, left, pw)
    for g, source in enumerate(sources):
        x0 = left + g * group + (group - bar * nb) / 2
        n = next((value[b, source]["n"] for b in backbones if (b, source) in value), "")
        parts.append(f'<text x="{left + g * group + group / 2:.1f}" y="{top + ph + 16}" text-anchor="middle">'
                     f'{esc(source)} (n={esc(n)})</text>')
        for i, backbone in enumerate(backbones):
            row = value.get((backbone, source))
            if row is None:
                continue
            x = x0 + i * bar
            parts.append(f'<rect x="{x:.1f}" y="{py(row["mrr"]):.1f}" width="{bar - 2:.1f}" '
                         f'height="{py(0) - py(row["mrr"]):.1f}" fill="{colors[backbone]}">'
                         f'<title>{esc(backbone)} {esc(source)}: MRR {row["mrr"]:.3f}</title></rect>')
            if row.get("mrr_lo") is not None:
                cx = x + (bar - 2) / 2
                parts.append(f'<line x1="{cx:.1f}" y1="{py(row["mrr_lo"]):.1f}" x2="{cx:.1f}" '
                             f'y2="{py(row["mrr_hi"]):.1f}" stroke="#333"/>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
                 f'<text x="12" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {top + ph / 2})">'
                 f'MRR</text>')
    parts.append(_legend(backbones, colors, left + pw + 16, top + 10))
    parts.append("</svg>")
    return "".join(parts)


def cost_rows(stages: dict, backbones: list[str]) -> list[dict]:
    """Encode cost per backbone from manifest encode entries; a fusion costs the sum of its members."""

    def side(name: str, which: str) -> dict:
        return stages.get(encode_entry(name, which), {})

    def gpu_memory(entry: dict) -> float | None:
        for key in GPU_MEMORY_KEYS:
            if entry.get(key) is not None:
                return entry[key] / 2**30 if key.endswith("bytes") else entry[key] / 1024
        return None

    rows = []
    for name in backbones:
        members = parse_fusion_name(name)[1] if is_fusion(name) else [name]
        images = [side(m, "images") for m in members]
        texts = [side(m, "texts") for m in members]
        if not any(images) and not any(texts):
            continue
        img_s = sum(e.get("seconds", 0) or 0 for e in images)
        txt_s = sum(e.get("seconds", 0) or 0 for e in texts)
        n_img = images[0].get("rows") if images[0] else None
        n_txt = texts[0].get("rows") if texts[0] else None
        memories = [m for m in (gpu_memory(e) for e in images + texts) if m is not None]
        rows.append({"backbone": name, "image_seconds": img_s, "text_seconds": txt_s, "images": n_img, "texts": n_txt,
                     "images_per_s": n_img / img_s if n_img and img_s else None,
                     "texts_per_s": n_txt / txt_s if n_txt and txt_s else None,
                     "gpu_gib": max(memories) if memories else None,
                     "device": next((e.get("device") for e in images + texts if e.get("device")), None)})
    return rows


def cost_table_html(costs: list[dict], quality: dict[str, dict]) -> str:
    lines = ["<table>", ('<tr><th class="name">backbone</th><th>images</th><th>image encode s</th><th>images/s</th>'
                         "<th>texts</th><th>text encode s</th><th>texts/s</th><th>GPU memory GiB</th><th>MRR</th>"
                         "</tr>")]
    for c in costs:
        q = quality.get(c["backbone"], {})
        lines.append(f'<tr><td class="name">{esc(c["backbone"])}</td><td>{esc(c["images"] or "–")}</td>'
                     f'<td>{_fmt(c["image_seconds"], 1)}</td><td>{_fmt(c["images_per_s"], 1)}</td>'
                     f'<td>{esc(c["texts"] or "–")}</td><td>{_fmt(c["text_seconds"], 1)}</td>'
                     f'<td>{_fmt(c["texts_per_s"], 1)}</td><td>{_fmt(c["gpu_gib"], 2)}</td>'
                     f'<td>{_fmt(q.get("mrr"))}</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


def cost_quality_svg(costs: list[dict], quality: dict[str, dict], colors: dict[str, str]) -> str:
    """MRR (with its 95% whisker) against encode seconds (images + texts) per backbone."""
    points = [(c["backbone"], c["image_seconds"] + c["text_seconds"], quality[c["backbone"]])
              for c in costs if c["backbone"] in quality]
    height, left, right, top, bottom = 300, 50, _legend_room([p[0] for p in points]), 15, 40
    width, pw, ph = left + PLOT_W + right, PLOT_W, height - top - bottom
    xticks, xmax = _ticks(max([p[1] for p in points] + [0.01]) * 1.05)
    yticks, ymax = _ticks(min(1.0, max([p[2].get("mrr_hi") or p[2]["mrr"] for p in points] + [0.05])))

    def px(v: float) -> float:
        return left + v / xmax * pw

    def py(v: float) -> float:
        return top + (1 - v / ymax) * ph

    parts = [_svg_open(width, height, "Cost against quality")]
    parts += _y_grid(yticks, py, left, pw)
    for v in xticks:
        parts.append(f'<line x1="{px(v):.1f}" y1="{top}" x2="{px(v):.1f}" y2="{top + ph}" stroke="#eee"/>'
                     f'<text x="{px(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{_tick_label(v)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
                 f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">encode seconds (images + texts)'
                 f'</text><text x="12" y="{top + ph / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + ph / 2})">MRR</text>')
    for name, seconds, q in points:
        x, y = px(seconds), py(q["mrr"])
        if q.get("mrr_lo") is not None:
            parts.append(f'<line x1="{x:.1f}" y1="{py(q["mrr_lo"]):.1f}" x2="{x:.1f}" y2="{py(q["mrr_hi"]):.1f}" '
                         f'stroke="{colors[name]}"/>')
        # the label goes left of its point when it would run past the picture's right edge
        fits = x + 8 + CHAR_W * len(name) <= width
        label = (f'<text x="{x + 8:.1f}" y="{y - 6:.1f}">' if fits else
                 f'<text x="{x - 8:.1f}" y="{y - 6:.1f}" text-anchor="end">') + f"{esc(name)}</text>"
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colors[name]}"><title>{esc(name)}: '
                     f'{seconds:.1f} s, MRR {q["mrr"]:.3f}</title></circle>{label}')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- examples with thumbnails

def _thumbnail_uri(data: bytes | None) -> str | None:
    """A JPEG data URI of the image scaled into THUMB x THUMB, or None when it cannot be decoded."""
    from newsclip.workers.images import ImageDecodeError, decode_image

    try:
        image = decode_image(data, alpha="white")  # a thumbnail: as a viewer shows it
    except ImageDecodeError:
        return None
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def load_images(output_dir: Path, image_ids: set[str], images_spec: str | None) -> dict[str, bytes]:
    """Encoded bytes of the wanted images, read only from the shards `prepared/candidates.parquet` names for them."""
    from newsclip.runtime.store import parquet_files

    found: dict[str, bytes] = {}
    files: dict[str, list[str]] = {}
    candidates = output_dir / "prepared" / "candidates.parquet"
    if candidates.exists():
        where = (pl.read_parquet(candidates, columns=["image_id", "file"])
                 .filter(pl.col("image_id").is_in(list(image_ids))))
        for file, ids in where.group_by("file").agg("image_id").iter_rows():
            files[file] = ids
    shards = [(Path(f), ids) for f, ids in sorted(files.items()) if Path(f).exists()]
    missing = set(image_ids) - {i for _, ids in shards for i in ids}
    if missing and images_spec:  # shards moved since prepare (or a relative path from another cwd): scan the input
        try:
            shards += [(p, sorted(missing)) for p in parquet_files(images_spec, "input.images")]
        except FileNotFoundError:
            pass
    for path, ids in shards:
        wanted = [i for i in ids if i not in found]
        if not wanted:
            continue
        table = pq.read_table(path, columns=["image_id", "image"], filters=[("image_id", "in", wanted)])
        for image_id, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()):
            found.setdefault(str(image_id), data)
    return found


def _pick_examples(ranks: dict[str, int], count: int) -> list[str]:
    """A hit at rank 1, one ranked 2-5, one further down or missed, then the rest, in id order: deterministic."""
    ids = sorted(ranks)
    chosen: list[str] = []
    for test in (lambda r: r == 1, lambda r: 2 <= r <= 5, lambda r: r == 0 or r > 5):
        pick = next((i for i in ids if test(ranks[i]) and i not in chosen), None)
        if pick is not None and len(chosen) < count:
            chosen.append(pick)
    chosen += [i for i in ids if i not in chosen][: max(0, count - len(chosen))]
    return chosen


def examples_html(output_dir: Path, backbone: str, queries: pl.DataFrame, images_spec: str | None,
                  count: int = 5, translated: pl.DataFrame | None = None) -> str:

    path = output_dir / "rankings" / f"{rankings_stem(backbone, 'text_to_image')}.parquet"
    if not path.exists() or count <= 0:
        return "<p class=\"note\">No rankings to show.</p>"
    rankings = pl.read_parquet(path)
    joined = queries.join(rankings, on="article_id", how="inner")
    if len(joined) == 0:
        return "<p class=\"note\">No ranked queries.</p>"
    truth_rank = {}
    for article_id, truth, ranked in joined.select("article_id", "image_id", "image_ids").iter_rows():
        truth_rank[article_id] = (ranked.index(truth) + 1) if truth in ranked else 0
    chosen = _pick_examples(truth_rank, count)
    rows = {r["article_id"]: r for r in joined.filter(pl.col("article_id").is_in(chosen)).iter_rows(named=True)}
    wanted = {i for a in chosen for i in rows[a]["image_ids"][:5]} | {rows[a]["image_id"] for a in chosen}
    data = load_images(output_dir, wanted, images_spec)
    english = dict(zip(translated["article_id"], translated["query_text"])) if translated is not None else {}
    parts = []
    for article_id in chosen:
        row, rank = rows[article_id], truth_rank[article_id]
        body = (row.get("body") or "").strip()
        if len(body) > BODY_CHARS:
            body = body[:BODY_CHARS].rstrip() + " …"
        status = f"correct image at rank {rank}" if rank else "correct image not in the top k"
        lang = f" · lang {esc(row['lang'])}" if row.get("lang") else ""
        parts.append(f'<div class="example"><h3>{esc(row.get("title") or "(no title)")}</h3>'
                     f'<div class="meta">article {esc(article_id)} · source {esc(row.get("source"))}{lang} · '
                     f'{esc(status)}</div><div class="body">{esc(body)}</div>')
        if article_id in english and english[article_id] and row.get("lang") not in (None, "en"):
            text = english[article_id][:BODY_CHARS]
            parts.append(f'<div class="body"><b>English (translated):</b> {esc(text)}</div>')
        parts.append('<div class="thumbs">')
        for position, (image_id, score) in enumerate(zip(row["image_ids"][:5], row["scores"][:5]), start=1):
            hit = image_id == row["image_id"]
            caption = f"#{position} · {score:.3f}" + (" ✓ correct" if hit else "")
            parts.append(_thumb(image_id, data.get(image_id), caption, "thumb hit" if hit else "thumb"))
        if not 1 <= rank <= 5:
            where = f"correct image: rank {rank}" if rank else "correct image: not ranked"
            parts.append(_thumb(row["image_id"], data.get(row["image_id"]), where, "thumb truth"))
        parts.append("</div></div>")
    return "\n".join(parts)


def _thumb(image_id: str, data: bytes | None, caption: str, css: str) -> str:
    uri = _thumbnail_uri(data) if data else None
    picture = (f'<img src="{uri}" alt="{esc(image_id)}">' if uri else '<span class="missing">no image</span>')
    return f'<div class="{css}">{picture}<br>{esc(caption)}<br><span class="meta">{esc(image_id)}</span></div>'


# ---------------------------------------------------------------- the page

def _queries(output_dir: Path) -> pl.DataFrame:
    from newsclip.runtime.store import parquet_files

    files = parquet_files(output_dir / "prepared" / "queries", "prepared queries")
    frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    for column in ("title", "body", "lang", "source"):
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, pl.String).alias(column))
    return frame.select("article_id", "image_id", "title", "body", "lang", "source")


def _translated(output_dir: Path) -> pl.DataFrame | None:
    folder = output_dir / "translated"
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    if not files:
        return None
    try:
        return pl.concat([pl.read_parquet(f, columns=["article_id", "query_text"]) for f in files])
    except (pl.exceptions.PolarsError, OSError):
        return None


def render_html(output_dir: Path, cfg=None, examples: int = 5, example_backbone: str | None = None) -> str:
    """The whole report as one HTML string. `cfg` (a JobConfig or anything with `name`, `backbones`,
    `input.images`) is optional: without it the backbones come from metrics.json in its order."""
    output_dir = Path(output_dir)
    metrics = _read_json(output_dir / "metrics.json")
    stages = _read_json(output_dir / "manifest.json").get("stages", {})
    k = metrics.get("k", 100)
    all_rows = metrics.get("rows", [])
    t2i = [r for r in all_rows if r.get("direction", "text_to_image") == "text_to_image"]
    i2t = [r for r in all_rows if r.get("direction") == "image_to_text"]
    ordered = list(dict.fromkeys(r["backbone"] for r in all_rows))
    wanted = list(getattr(cfg, "backbones", None) or [])
    names = [b for b in wanted if b in ordered] + [b for b in ordered if b not in wanted]
    labels = display_names(names)
    # from here on a backbone is its label: tables, plots and colours all key on it
    backbones = [labels[b] for b in names]
    t2i, i2t = _relabel(t2i, labels, "backbone"), _relabel(i2t, labels, "backbone")
    colors = {b: _color(i) for i, b in enumerate(backbones)}
    overall = sorted([r for r in t2i if r["source"] == "all"], key=lambda r: backbones.index(r["backbone"]))
    quality = {r["backbone"]: r for r in overall}
    name = getattr(cfg, "name", None) or output_dir.name
    images_spec = getattr(getattr(cfg, "input", None), "images", None)
    prep = stages.get("prepare", {})
    has_ci = any("mrr_lo" in r for r in overall)

    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>newsclip report: {esc(name)}</title><style>{CSS}</style></head><body>",
           f"<h1>newsclip report: {esc(name)}</h1>"]
    summary = esc(scope_sentence(metrics, stages)) + " Paper rows (grey): Zhang et al., MediaEval 2022."
    if has_ci:
        summary += f" Brackets: {esc(INTERVALS)}."
    out.append(f'<p class="note">{summary}</p>')
    notes = evaluation_notes(metrics, prep)
    out += [f'<p class="note"><b>{kind}:</b> {esc(text)}.</p>' for kind, text in notes]
    out.append(checkpoints_note(labels))

    out += ["<h2>All backbones (text to image)</h2>", metrics_table_html(overall, k, colors=colors)]
    if overall:
        paper = ", the paper's (dashed)" if any(paper_scores(r["backbone"]) for r in overall) else ""
        out += ["<h2>Recall@K</h2>", "<figure>", recall_curves_svg(overall, colors),
                f"<figcaption>Recall@K per backbone (solid; shaded: 95% interval){paper}.</figcaption>", "</figure>"]
        per_source = [r for r in t2i if r["source"] != "all"]
        out += ["<h2>MRR per source</h2>", "<figure>", mrr_by_source_svg(per_source or overall, backbones, colors),
                "<figcaption>MRR@k per article source (whiskers: 95% interval).</figcaption></figure>"]
        for backbone in backbones:
            rows = [r for r in per_source if r["backbone"] == backbone]
            if rows:
                out += [f"<h3>{esc(backbone)}</h3>", metrics_table_html(rows, k, with_paper=False, label="source")]
    paired = _relabel([p for p in metrics.get("paired", []) if p.get("direction", "text_to_image") == "text_to_image"],
                      labels, "a", "b")
    if paired:
        out += ["<h2>Paired comparisons</h2>",
                f'<p class="note">{esc(paired_note(paired))}</p>', paired_table_html(paired)]
    costs = _relabel(cost_rows(stages, names), labels, "backbone")
    if costs:
        out += ["<h2>Cost against quality</h2>", cost_table_html(costs, quality), "<figure>",
                cost_quality_svg(costs, quality, colors),
                "<figcaption>Encode seconds per backbone (a fusion: the sum of its members) against MRR.</figcaption>",
                "</figure>"]
    if i2t:
        rows = [r for r in i2t if r["source"] == "all"]
        out += ["<h2>Image to text (which article is this image for)</h2>",
                metrics_table_html(rows, k, with_paper=False, colors=colors)]
    knn = [x for x in metrics.get("knn", []) if x.get("recall_at_k_vs_exact") is not None]
    if knn:
        out.append("<ul>" + "".join(f"<li>{esc(x['index'])} index for {esc(x['backbone'])} {esc(x['direction'])}: "
                                    f"recall@{esc(k)} {x['recall_at_k_vs_exact']:.4f} against exact search</li>"
                                    for x in knn) + "</ul>")
    if overall and examples > 0:
        by_label = {label: name for name, label in labels.items()}
        shown = example_backbone or by_label[max(overall, key=lambda r: (r["mrr"], r["backbone"]))["backbone"]]
        out += [f"<h2>Examples ({esc(labels.get(shown, shown))})</h2>",
                ('<p class="note">Each article with its top-5 images and their scores (cosine similarity; for a '
                 "fusion, the fused score); the correct one has a green frame (dashed: shown separately when it is "
                 "not in the top 5).</p>")]
        try:
            queries = _queries(output_dir)
        except FileNotFoundError:
            out.append('<p class="note">No prepared queries.</p>')
        else:
            out.append(examples_html(output_dir, shown, queries, images_spec, examples, _translated(output_dir)))
    out += _rejects_html(output_dir, prep)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _rejects_html(output_dir: Path, prep: dict) -> list[str]:
    from newsclip.runtime.rejects import rejects_summary

    rejects = rejects_summary(output_dir).select("stage", "reason", "rows")
    parts = ["<h2>Rejected rows</h2>"]
    if prep:
        parts.append(f'<p class="note">{esc(prep.get("articles_in"))} articles and {esc(prep.get("images_in"))} '
                     f'images in; {esc(prep.get("usable_pairs"))} usable article-image pairs.</p>')
    if len(rejects):
        parts.append("<table><tr><th class=\"name\">stage</th><th class=\"name\">reason</th><th>rows</th></tr>"
                     + "".join(f'<tr><td class="name">{esc(s)}</td><td class="name">{esc(r)}</td><td>{esc(n)}</td></tr>'
                               for s, r, n in rejects.iter_rows()) + "</table>")
    else:
        parts.append("<p>None.</p>")
    return parts


# what the intervals are, and what they are not: the images ranked against are held fixed
INTERVALS = ("95% percentile bootstrap intervals over resampled articles, conditional on the gallery: the candidate "
             "images stay fixed, so the intervals leave out how the scores would vary with another set of images")


def scope_sentence(metrics: dict, stages: dict) -> str:
    """What was scored: queries scored of those sampled, against how many candidates, top k."""
    k = metrics.get("k", 100)
    row = next((r for r in metrics.get("rows", []) if r["source"] == "all"
                and r.get("direction", "text_to_image") == "text_to_image"), {})
    entry = next((e for name, e in stages.items() if name.startswith("knn:") and name.endswith(":text_to_image")), {})
    sampled = f" (of {row['n_sampled']} sampled)" if "n_sampled" in row else ""
    return (f"Text-to-image retrieval: {row.get('n', '?')} article texts{sampled}, each ranked against "
            f"{entry.get('candidates', '?')} candidate images; top {k} by cosine similarity. Recall is a fraction.")


def evaluation_notes(metrics: dict, prep: dict) -> list[tuple[str, str]]:
    """(Note | Warning, sentence) for everything that qualifies the numbers: fewer usable pairs than asked for,
    sampled articles left unscored, true images that failed to encode, exact ties, short ranking lines."""
    notes = [("Note", prep["sample_note"])] if prep.get("sample_note") else []
    for row in metrics.get("rows", []):
        if row["source"] != "all" or row["backbone"] != metrics["rows"][0]["backbone"]:
            continue  # the counts are the same for every backbone
        direction = row["direction"].replace("_", " ")
        if row.get("n_sampled", row["n"]) > row["n"]:
            notes.append(("Warning", f"{direction}: {row['n_sampled'] - row['n']} of the {row['n_sampled']} sampled "
                          "queries were left out after sampling (see the rejected rows, translate stage)"))
        if row.get("n_unscoreable"):
            notes.append(("Warning", f"{direction}: {row['n_unscoreable']} of the {row['n']} scored queries cannot be "
                          "found because their image failed to encode; they are scored as misses"))
    ties = metrics.get("ties", {})
    if ties.get("duplicate_truths"):
        how = {"id": "the lower id first", "optimistic": "the true image first",
               "pessimistic": "the true image last"}[ties["policy"]]
        notes.append(("Note", f"{ties['duplicate_truths']} queries have a byte-identical copy of their true image "
                      f"among the candidates under another id; these exact ties are ranked {how} "
                      f"(eval.ties: {ties['policy']})"))
    notes += [("Warning", f"{x['short_lines']} lines of the {x['backbone']} {x['direction']} rankings hold fewer "
               f"than {metrics['k']} image ids ({x['short_reason']}); the organisers' evaluator expects exactly "
               f"{metrics['k']}") for x in metrics.get("knn", []) if x.get("short_lines")]
    return notes


def paired_note(paired: list[dict]) -> str:
    """How the paired comparisons (at least one) decide, and that they are corrected as one family."""
    return (f"Paired bootstrap of the {paired[0].get('metric', 'mrr')} difference on the same articles. A decision is "
            f"made when the Holm-adjusted p-value is below 0.05: Holm's correction over the "
            f"{paired[0].get('comparisons', len(paired))} comparisons of this direction keeps the chance of any false "
            "decision under 5%. The intervals shown are the uncorrected 95% intervals of A − B.")


def write_html(output_dir: Path, cfg=None, **kwargs) -> Path:
    """Render and write `report.html` atomically."""
    from newsclip.runtime.store import write_text

    return write_text(Path(output_dir) / "report.html", render_html(output_dir, cfg, **kwargs))
