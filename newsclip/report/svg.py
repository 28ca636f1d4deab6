"""The report's charts as hand-made inline SVG (no plotting dependency): Recall@K, MRR per source, cost and quality."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from newsclip.report.escape import esc
from newsclip.retrieval.metrics import CUTOFFS
from newsclip.retrieval.paper import paper_scores

# Tableau 10: distinguishable for up to ten lines, and a colour-blind-friendlier order than matplotlib's default
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac"]
PLOT_W = 510  # the plot area's width in every chart; legends and labels get room beside it
CHAR_W = 6.5  # a generous average glyph width of the 11 px chart font, to size room for text without measuring it


def series_colors(names: Sequence[str]) -> dict[str, str]:
    """A colour per series, in order; the tables' swatches use the same, so a colour means one backbone throughout."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


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


@dataclass(frozen=True)
class Frame:
    """A chart's axes: a PLOT_W-wide plot area whose y axis runs from 0 to `ymax`, with room on its right for
    `names` (the legend's, or the labels beside the points)."""

    label: str  # what the picture shows, for screen readers
    height: int
    names: Sequence[str]
    y_title: str
    y_ticks: Sequence[float]
    ymax: float = 1.0
    y_format: Callable[[float], str] = _tick_label
    x_title: str = ""  # none where the x tick labels say it all

    left: ClassVar[int] = 50  # room for the y tick labels and the rotated y title
    top: ClassVar[int] = 15
    bottom: ClassVar[int] = 40  # the x tick labels, then the x title

    @property
    def width(self) -> int:
        return self.left + PLOT_W + _legend_room(self.names)

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom

    def x(self, fraction: float) -> float:
        """The x of a point `fraction` of the way across the plot area."""
        return self.left + fraction * PLOT_W

    def y(self, value: float) -> float:
        return self.top + (1 - value / self.ymax) * self.plot_height

    def legend(self, colors: dict[str, str], dashed_note: bool = False) -> str:
        """A swatch and a name per series right of the plot; `dashed_note` adds the dashed line of the paper."""
        x, y = self.left + PLOT_W + 16, self.top + 10
        parts = [f'<rect x="{x}" y="{y + i * 16 - 8}" width="10" height="10" fill="{colors[name]}"/>'
                 f'<text x="{x + 14}" y="{y + i * 16 + 1}">{esc(name)}</text>' for i, name in enumerate(self.names)]
        if dashed_note:
            yy = y + len(self.names) * 16 + 4
            parts.append(f'<line x1="{x}" y1="{yy - 3}" x2="{x + 10}" y2="{yy - 3}" stroke="#666" '
                         f'stroke-dasharray="3,2"/><text x="{x + 14}" y="{yy + 1}" fill="#666">paper</text>')
        return "".join(parts)

    def svg(self, content: list[str], x_ticks: Sequence[tuple[float, object]], x_grid: bool = True) -> str:
        """The picture: labelled grid lines (vertical ones at `x_ticks` when `x_grid`), the plot rectangle and the
        axis titles, then `content` on top."""
        left, top, pw, ph = self.left, self.top, PLOT_W, self.plot_height
        parts = [f'<svg width="{self.width}" height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
                 f'role="img" aria-label="{esc(self.label)}" style="font-family:inherit;font-size:11px">']
        parts += [f'<line x1="{left}" y1="{self.y(v):.1f}" x2="{left + pw}" y2="{self.y(v):.1f}" stroke="#eee"/>'
                  f'<text x="{left - 6}" y="{self.y(v) + 4:.1f}" text-anchor="end">{esc(self.y_format(v))}</text>'
                  for v in self.y_ticks]
        for x, label in x_ticks:
            if x_grid:
                parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eee"/>')
            parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{esc(label)}</text>')
        parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        if self.x_title:
            parts.append(f'<text x="{left + pw / 2}" y="{self.height - 4}" text-anchor="middle">'
                         f'{esc(self.x_title)}</text>')
        parts.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {top + ph / 2})">'
                     f'{esc(self.y_title)}</text>')
        return "".join([*parts, *content, "</svg>"])


def _recall_curve(row: dict, paper: dict | None, cutoffs: list[int], px: Callable[[int], float],
                  py: Callable[[float], float], color: str) -> list[str]:
    """One backbone's curve: the paper's (dashed), our 95% band, our line, and a point with its value per K."""
    parts = []
    if paper:
        pts = " ".join(f"{px(k):.1f},{py(paper[f'recall@{k}']):.1f}" for k in cutoffs if f"recall@{k}" in paper)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.2" '
                     f'stroke-dasharray="4,3" opacity="0.8"/>')
    if all(row.get(f"recall@{k}_lo") is not None for k in cutoffs):
        upper = [f"{px(k):.1f},{py(row[f'recall@{k}_hi']):.1f}" for k in cutoffs]
        lower = [f"{px(k):.1f},{py(row[f'recall@{k}_lo']):.1f}" for k in reversed(cutoffs)]
        parts.append(f'<polygon points="{" ".join(upper + lower)}" fill="{color}" opacity="0.12"/>')
    pts = " ".join(f"{px(k):.1f},{py(row[f'recall@{k}']):.1f}" for k in cutoffs)
    parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
    parts += [f'<circle cx="{px(k):.1f}" cy="{py(row[f"recall@{k}"]):.1f}" r="3" fill="{color}">'
              f'<title>{esc(row["backbone"])} R@{k} = {row[f"recall@{k}"]:.3f}</title></circle>' for k in cutoffs]
    return parts


def recall_curves_svg(rows: list[dict], colors: dict[str, str], with_paper: bool = True) -> str:
    """Recall@K against K (log axis) per backbone; the paper's curve dashed in the same colour."""
    frame = Frame("Recall at K curves", 340, [r["backbone"] for r in rows], "Recall@K", np.linspace(0, 1, 6),
                  y_format=lambda v: f"{v:.1f}", x_title="K (log scale)")
    cutoffs = [c for c in CUTOFFS if all(f"recall@{c}" in r for r in rows)]
    lx0, lx1 = math.log(cutoffs[0]), math.log(cutoffs[-1]) if len(cutoffs) > 1 else math.log(cutoffs[0]) + 1

    def px(k: int) -> float:
        return frame.x((math.log(k) - lx0) / (lx1 - lx0))

    papers = {r["backbone"]: paper_scores(r["backbone"]) if with_paper else None for r in rows}
    content = [part for row in rows
               for part in _recall_curve(row, papers[row["backbone"]], cutoffs, px, frame.y, colors[row["backbone"]])]
    content.append(frame.legend(colors, dashed_note=any(papers.values())))
    return frame.svg(content, [(px(k), k) for k in cutoffs])


def _bar(row: dict, x: float, width: float, py: Callable[[float], float], color: str, title: str) -> list[str]:
    """One MRR bar from 0, with its 95% whisker when the row has an interval."""
    parts = [f'<rect x="{x:.1f}" y="{py(row["mrr"]):.1f}" width="{width:.1f}" height="{py(0) - py(row["mrr"]):.1f}" '
             f'fill="{color}"><title>{esc(title)}: MRR {row["mrr"]:.3f}</title></rect>']
    if row.get("mrr_lo") is not None:
        cx = x + width / 2
        parts.append(f'<line x1="{cx:.1f}" y1="{py(row["mrr_lo"]):.1f}" x2="{cx:.1f}" y2="{py(row["mrr_hi"]):.1f}" '
                     f'stroke="#333"/>')
    return parts


def mrr_by_source_svg(rows: list[dict], backbones: list[str], colors: dict[str, str]) -> str:
    """Grouped bars: one group per source, one bar per backbone, 95% whiskers when present."""
    sources = sorted({r["source"] for r in rows if r["source"] != "all"}) or ["all"]
    value = {(r["backbone"], r["source"]): r for r in rows}
    yticks, ymax = _ticks(min(1.0, max([r.get("mrr_hi") or r["mrr"] for r in rows] + [0.05])))
    frame = Frame("MRR per source", 300, backbones, "MRR", yticks, ymax)
    group = PLOT_W / len(sources)
    bar = min(28.0, group * 0.8 / max(len(backbones), 1))
    content, x_ticks = [], []
    for g, source in enumerate(sources):
        x0 = frame.left + g * group + (group - bar * len(backbones)) / 2
        n = next((value[b, source]["n"] for b in backbones if (b, source) in value), "")
        x_ticks.append((frame.left + g * group + group / 2, f"{source} (n={n})"))
        for i, backbone in enumerate(backbones):
            if (backbone, source) in value:
                content += _bar(value[backbone, source], x0 + i * bar, bar - 2, frame.y, colors[backbone],
                                f"{backbone} {source}")
    content.append(frame.legend(colors))
    return frame.svg(content, x_ticks, x_grid=False)


def _cost_point(name: str, seconds: float, q: dict, frame: Frame, x: float, color: str) -> str:
    """A backbone's point with its MRR whisker and its name beside it."""
    y = frame.y(q["mrr"])
    whisker = (f'<line x1="{x:.1f}" y1="{frame.y(q["mrr_lo"]):.1f}" x2="{x:.1f}" y2="{frame.y(q["mrr_hi"]):.1f}" '
               f'stroke="{color}"/>' if q.get("mrr_lo") is not None else "")
    # the label goes left of its point when it would run past the picture's right edge
    fits = x + 8 + CHAR_W * len(name) <= frame.width
    label = (f'<text x="{x + 8:.1f}" y="{y - 6:.1f}">' if fits else
             f'<text x="{x - 8:.1f}" y="{y - 6:.1f}" text-anchor="end">') + f"{esc(name)}</text>"
    return (f'{whisker}<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"><title>{esc(name)}: '
            f'{seconds:.1f} s, MRR {q["mrr"]:.3f}</title></circle>{label}')


def cost_quality_svg(costs: list[dict], quality: dict[str, dict], colors: dict[str, str]) -> str:
    """MRR (with its 95% whisker) against encode seconds (images + texts) per backbone."""
    points = [(c["backbone"], c["image_seconds"] + c["text_seconds"], quality[c["backbone"]])
              for c in costs if c["backbone"] in quality]
    xticks, xmax = _ticks(max([p[1] for p in points] + [0.01]) * 1.05)
    yticks, ymax = _ticks(min(1.0, max([p[2].get("mrr_hi") or p[2]["mrr"] for p in points] + [0.05])))
    frame = Frame("Cost against quality", 300, [p[0] for p in points], "MRR", yticks, ymax,
                  x_title="encode seconds (images + texts)")
    content = [_cost_point(name, seconds, q, frame, frame.x(seconds / xmax), colors[name])
               for name, seconds, q in points]
    return frame.svg(content, [(frame.x(v / xmax), _tick_label(v)) for v in xticks])


def training_curve_svg(losses: dict, colors: dict[str, str] | None = None) -> str:
    """A fine-tune's losses.json: the training loss per step and the validation loss where it was measured, against
    the step; the best validation step marked."""
    colors = colors or {"train": PALETTE[0], "validation": PALETTE[1]}
    train = [(r["step"], r["loss"]) for r in losses.get("train_loss", [])]
    validation = [(r["step"], r["loss"]) for r in losses.get("validation_loss", [])]
    steps = max([s for s, _ in train + validation] + [1])
    yticks, ymax = _ticks(max([v for _, v in train + validation] + [0.01]))
    names = ["train", "validation"] if validation else ["train"]
    frame = Frame("Training curve", 300, names, "loss", yticks, ymax, x_title="optimizer step")

    def points(series: list[tuple[int, float]]) -> str:
        return " ".join(f"{frame.x(s / steps):.1f},{frame.y(v):.1f}" for s, v in series)

    content = [f'<polyline points="{points(train)}" fill="none" stroke="{colors["train"]}" stroke-width="1.5"/>']
    if validation:
        content.append(f'<polyline points="{points(validation)}" fill="none" stroke="{colors["validation"]}" '
                       f'stroke-width="2"/>')
        content += [f'<circle cx="{frame.x(s / steps):.1f}" cy="{frame.y(v):.1f}" '
                    f'r="{5 if s == losses.get("best_step") else 3}" fill="{colors["validation"]}">'
                    f'<title>step {s}: validation loss {v:.3f}</title></circle>' for s, v in validation]
    content.append(frame.legend({n: colors[n] for n in names}))
    xticks, xmax = _ticks(steps)
    return frame.svg(content, [(frame.x(v / steps), _tick_label(v)) for v in xticks if v <= steps])
