"""report.html for a synthetic two-backbone output folder (plus a fusion): content, self-containment, escaping."""

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from PIL import Image

from newsclip.names import fusion_name, slug
from newsclip.report.data import display_names
from newsclip.report.html import checkpoints_note, render_html, write_html
from newsclip.report.notes import INTERVALS, evaluation_notes, paired_note
from newsclip.retrieval.bootstrap import ci_rows, decide_as_one_family, paired_rows
from newsclip.retrieval.paper import paper_scores
from newsclip.retrieval.ranks import query_ranks
from newsclip.runtime.fused_rankings import fuse_rankings
from newsclip.runtime.layout import Layout
from newsclip.runtime.store import write_table, write_text

HOSTILE_TITLE = "<script>alert('x')</script> Flood & storm \"warning\""
K = 10
KEYS = ["mrr", "recall@1", "recall@5", "recall@10"]  # the metrics of a top-10 ranking, in table order
# where each backbone ranks article i's own image (0: not in its top K), by i % 6. The second is the worse, enough
# for the paired comparisons to decide against it; the first and the fusion of the two stay too close to call.
RANKS = ([1, 3, 0, 2, 1, 7], [1, 9, 0, 5, 0, 8])


def _image_bytes(i: int) -> bytes:
    rng = np.random.default_rng(i)
    colour = tuple(int(c) for c in rng.integers(40, 255, 3))
    image = Image.new("RGB", (96, 64), colour)
    image.paste((255 - colour[0], 255 - colour[1], 255 - colour[2]), (10 + i % 50, 10, 40 + i % 50, 50))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if i % 2 else "JPEG")
    return buffer.getvalue()


def build_output(root: Path, n: int = 24, backbones=("RN50", "ViT-B/32")) -> tuple[Path, SimpleNamespace]:
    """A committed-looking output folder: image shards, prepared/, rankings/, metrics.json (with intervals and paired
    comparisons, as evaluate writes them), manifest.json, rejects/. Returns (output dir, a config-like object)."""
    out, data = root / "output", root / "data" / "images"
    image_ids = [f"img{i:03d}" for i in range(n)]
    blobs = [_image_bytes(i) for i in range(n)]
    blobs[5] = b"not an image"  # a broken image in the shards: shown as a placeholder, never a crash
    for part in range(2):
        rows = list(range(part, n, 2))
        write_table(pl.DataFrame({"image_id": [image_ids[i] for i in rows], "image": [blobs[i] for i in rows]},
                                 schema={"image_id": pl.String, "image": pl.Binary}).to_arrow(),
                    data / f"part-{part}.parquet")
    write_table(pl.DataFrame({"image_id": image_ids, "file": [str(data / f"part-{i % 2}.parquet") for i in range(n)],
                              "candidate": [True] * n}).to_arrow(), out / "prepared" / "candidates.parquet")
    articles = [f"art{i:03d}" for i in range(n)]
    queries = pl.DataFrame({
        "article_id": articles,
        "query_text": [f"text {i}" for i in range(n)],
        "title": [HOSTILE_TITLE if i == 0 else f"Article number {i}" for i in range(n)],
        "body": ["<img src=http://evil.example/x.png onerror=alert(1)> body " * 3 if i == 0 else f"Body of {i}. " * 20
                 for i in range(n)],
        "lang": ["en"] * n,
        "image_id": image_ids,  # article i belongs with image i
        "source": ["TW" if i % 3 else "RT" for i in range(n)],
    })
    write_table(queries.to_arrow(), out / "prepared" / "queries" / "part-00000.parquet")

    rng = np.random.default_rng(0)
    for b, backbone in enumerate(backbones):
        lists, score_lists = [], []
        for i in range(n):
            others = [image_ids[j] for j in rng.permutation(n) if j != i][:K]
            rank = RANKS[b][i % 6] if i else 1  # the first article: a hit for every backbone
            if rank:
                others.insert(rank - 1, image_ids[i])
            lists.append(others[:K])
            score_lists.append(sorted(rng.uniform(0.1, 0.4, K).tolist(), reverse=True))
        write_table(pl.DataFrame({"article_id": articles, "image_ids": lists, "scores": score_lists},
                                 schema={"article_id": pl.String, "image_ids": pl.List(pl.String),
                                         "scores": pl.List(pl.Float32)}).to_arrow(),
                    out / "rankings" / f"{slug(backbone)}.parquet")
    cfg = SimpleNamespace(name="html-test", output=out, layout=Layout(out), eval=SimpleNamespace(k=K),
                          input=SimpleNamespace(images=str(data)))
    fused = fusion_name(list(backbones), "rrf")
    fuse_rankings(cfg, fused)
    names = [*backbones, fused]
    cfg.backbones = tuple(names)

    ranks = {}
    for name in names:
        ranks[name], sources = query_ranks(queries, pl.read_parquet(out / "rankings" / f"{slug(name)}.parquet"), K)
    rows = ci_rows(ranks, sources, k=K, b=200, seed=0)
    paired = paired_rows(ranks, k=K, b=200, seed=0)
    write_text(out / "metrics.json", json.dumps({"k": K, "rows": rows, "paired": paired, "knn": []}))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["prepare"] = {"queries": n, "candidates": n, "articles_in": n + 1, "images_in": n,
                                     "usable_pairs": n, "sample_note": None}
    for b, backbone in enumerate(backbones):
        for side, seconds in (("images", 12.5 * (b + 1)), ("texts", 3.0)):
            manifest["stages"][f"encode:{slug(backbone)}:{side}"] = {"rows": n, "seconds": seconds}
    manifest["stages"][f"encode:{slug(backbones[1])}:images"]["gpu_memory_bytes"] = 3 * 2**30
    write_text(out / "manifest.json", json.dumps(manifest))
    write_table(pl.DataFrame({"id": ["art999"], "kind": ["article"], "reason": ["no text (title_body is empty)"],
                              "stage": ["prepare"]}).to_arrow(), out / "rejects" / "prepare.parquet")
    return out, cfg


class Page(HTMLParser):
    """Every start tag with its attributes, the text (unescaped) per innermost element, and every <table> as rows of
    cell texts (a cell's pieces joined by spaces) under the h2/h3 heading before it."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._heading: list[str] | None = None
        self._last_heading = ""
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("h2", "h3"):
            self._heading = []
        elif tag == "table":
            self._table = self.tables[self._last_heading] = []
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in ("h2", "h3") and self._heading is not None:
            self._last_heading, self._heading = "".join(self._heading).strip(), None
        elif tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(" ".join(p.strip() for p in self._cell if p.strip()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        for target in (self._heading, self._cell):
            if target is not None:
                target.append(data)

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.tags if t == tag)


def parse(document: str) -> Page:
    page = Page()
    page.feed(document)
    return page


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out, cfg = build_output(tmp_path_factory.mktemp("report"))
    document = render_html(out, cfg)
    return out, cfg, document, parse(document)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _with_interval(row: dict, key: str) -> str:
    """A table cell: the value, then its 95% interval in brackets."""
    return f"{row[key]:.3f} [{row[f'{key}_lo']:.3f}, {row[f'{key}_hi']:.3f}]"


def test_overall_table_equals_metrics_json_with_the_papers_rows(rendered):
    out, cfg, _, page = rendered
    overall = {r["backbone"]: r for r in _metrics(out)["rows"] if r["source"] == "all"}
    header, *rows = page.tables["All backbones (text to image)"]
    assert header == ["backbone", "n", f"MRR@{K}", "R@1", "R@5", "R@10"]  # with k=10 a R@100 would really be R@10
    expected = []
    for name in cfg.backbones:
        ours = overall[name]
        expected.append([name, str(ours["n"]), *(_with_interval(ours, key) for key in KEYS)])
        paper = paper_scores(name)
        if paper:  # the paper has no R@1
            expected.append([f"{name} (paper)", "2000", *(f"{paper[k]:.3f}" if k in paper else "–" for k in KEYS)])
    assert rows == expected
    assert [row[:4] for row in rows if "(paper)" in row[0]] == [["RN50 (paper)", "2000", "0.388", "–"],
                                                                ["ViT-B/32 (paper)", "2000", "0.384", "–"]]


def test_tables_under_their_headings(rendered):
    out, cfg, _, page = rendered
    assert list(page.tables) == ["All backbones (text to image)", *cfg.backbones, "Paired comparisons",
                                 "Cost against quality", "Rejected rows"]
    per_source = {(r["backbone"], r["source"]): r for r in _metrics(out)["rows"] if r["source"] != "all"}
    for name in cfg.backbones:
        header, *rows = page.tables[name]
        assert header[0] == "source"
        assert [(row[0], row[2]) for row in rows] == [(s, _with_interval(per_source[name, s], "mrr"))
                                                      for s in ("RT", "TW")]
    assert page.tables["Rejected rows"] == [["stage", "reason", "rows"],
                                            ["prepare", "no text (title_body is empty)", "1"]]
    assert "25 articles and 24 images in; 24 usable article-image pairs." in page.text


def _decision(pair: dict) -> str:
    """What a Holm-adjusted p-value below 0.05 decides, in the words of the table."""
    if pair["p_holm"] >= 0.05:
        return "no significant difference"
    return "A beats B" if pair["difference"] > 0 else "B beats A"


def test_paired_table_shows_each_pairs_decision(rendered):
    out, _, document, page = rendered
    paired = _metrics(out)["paired"]
    header, *rows = page.tables["Paired comparisons"]
    assert header == ["A", "B", "metric", "A − B", "95% interval", "share of resamples A > B", "p (Holm)", "decision"]
    assert rows == [[p["a"], p["b"], "mrr", f"{p['difference']:+.4f}", f"[{p['lo']:+.4f}, {p['hi']:+.4f}]",
                     f"{p['share_a_better']:.3f}", f"{p['p_holm']:.3f}", _decision(p)] for p in paired]
    # RANKS makes all three outcomes happen: the first backbone beats the second, the fusion beats the second,
    # the first and the fusion are too close to call
    fused = fusion_name(["RN50", "ViT-B/32"], "rrf")
    assert {(r[0], r[1]): r[-1] for r in rows} == {("RN50", "ViT-B/32"): "A beats B",
                                                   ("RN50", fused): "no significant difference",
                                                   ("ViT-B/32", fused): "B beats A"}
    assert document.count('decision-yes">') == 2  # a decision is green; no decision is not


def test_both_directions_verdicts_are_printed_as_one_family(tmp_path):
    from newsclip.report.markdown import render_markdown

    out, cfg = build_output(tmp_path)
    metrics = _metrics(out)
    reverse = [{**p, "direction": "image_to_text", "difference": -p["difference"]} for p in metrics["paired"]]
    metrics["paired"] = decide_as_one_family(metrics["paired"] + reverse)
    write_text(out / "metrics.json", json.dumps(metrics))
    page = parse(render_html(out, cfg))
    note = paired_note(metrics["paired"])
    assert "all 6 comparisons of this report" in note and note in page.text
    assert len(page.tables["Paired comparisons"]) == len(page.tables["Image to text"]) == 4  # a header, 3 pairs
    assert [row[-1] for row in page.tables["Image to text"][1:]] == [_decision(p) for p in metrics["paired"][3:]]
    cfg.fusion = ()
    markdown = render_markdown(cfg)
    assert "## Paired comparisons (text to image)" in markdown and "## Paired comparisons (image to text)" in markdown
    assert markdown.count(note) == 1


def test_cost_table_from_manifest(rendered):
    _, cfg, _, page = rendered
    header, *rows = page.tables["Cost against quality"]
    by_name = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert list(by_name) == list(cfg.backbones)
    fused = cfg.backbones[2]
    # build_output records 12.5 s and 25 s of image encoding, 3 s of text encoding each; a fusion costs both members
    assert [by_name[n]["image encode s"] for n in cfg.backbones] == ["12.5", "25.0", "37.5"]
    assert [by_name[n]["text encode s"] for n in cfg.backbones] == ["3.0", "3.0", "6.0"]
    # 3 GiB recorded for ViT-B/32 only; a fusion needs as much as its largest member
    assert {n: by_name[n]["GPU memory GiB"] for n in cfg.backbones} == {"RN50": "–", "ViT-B/32": "3.00", fused: "3.00"}


def test_plots_are_inline_svg(rendered):
    page = rendered[3]
    assert page.count("svg") == 3  # Recall@K curves, MRR per source, cost against quality
    assert page.count("polyline") == 3 + 2  # a curve per backbone (fusion included), the paper's for RN50 and ViT-B/32
    assert page.count("polygon") == 3  # a 95% band per curve
    dashed = [attrs for tag, attrs in page.tags if tag == "polyline" and attrs.get("stroke-dasharray")]
    assert len(dashed) == 2
    assert "the paper's (dashed)" in " ".join(page.text)  # the caption names them when they are drawn


def test_examples_show_thumbnails_as_data_uris_with_the_correct_one_marked(rendered):
    page = rendered[3]
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) >= 5
    for attrs in images:
        assert attrs["src"].startswith("data:image/jpeg;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        assert picture.format == "JPEG" and max(picture.size) <= 160
    classes = [attrs.get("class", "") for tag, attrs in page.tags if tag == "div"]
    assert classes.count("example") == 5
    assert "thumb hit" in classes  # the correct image in the top 5, marked
    assert "thumb truth" in classes  # an example whose correct image is not in the top 5 shows it separately


def test_self_contained_and_escaped(rendered):
    _, _, document, page = rendered
    assert page.count("script") == 0 and page.count("link") == 0 and page.count("iframe") == 0
    for tag, attrs in page.tags:
        for key, value in attrs.items():
            assert not key.startswith("on"), (tag, key)
            assert not (value or "").lower().startswith(("http:", "https:", "//")), (tag, key, value)
    assert "<script>" not in document and "<img src=http" not in document
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Flood &amp; storm &quot;warning&quot;" in document
    assert HOSTILE_TITLE in page.text  # the browser shows the title as text


def test_images_found_when_shards_moved(tmp_path):
    out, cfg = build_output(tmp_path, n=12)
    candidates = pl.read_parquet(out / "prepared" / "candidates.parquet")
    write_table(candidates.with_columns(pl.lit("/nonexistent/shard.parquet").alias("file")).to_arrow(),
                out / "prepared" / "candidates.parquet")
    path = write_html(out, cfg, examples=2)
    assert path == out / "report.html"
    thumbs = re.findall(r'<div class="thumb[^"]*">(<img|<span class="missing").*?<span class="meta">([^<]+)</span>',
                        path.read_text())
    assert len(thumbs) >= 2 * 5
    # found by scanning input.images: every thumbnail shows its picture but that of the one broken image
    assert [kind == "<img" for kind, image in thumbs] == [image != "img005" for kind, image in thumbs]


def test_renders_without_intervals_or_config(tmp_path):
    out, _ = build_output(tmp_path, n=12)
    plain = [{k: v for k, v in r.items() if not k.endswith(("_lo", "_hi"))} for r in _metrics(out)["rows"]]
    write_text(out / "metrics.json", json.dumps({"k": K, "rows": plain}))
    document = render_html(out, None, examples=1)
    page = parse(document)
    assert "<h1>newsclip report: output</h1>" in document  # the output folder names the job
    assert 'class="ci"' not in document and "Brackets:" not in document and page.count("polygon") == 0
    assert page.count("svg") == 3 and document.count('<div class="example">') == 1
    _, *rows = page.tables["All backbones (text to image)"]
    ours = [row for row in rows if "(paper)" not in row[0]]
    # metrics.json's order: no config says another
    assert ours == [[r["backbone"], str(r["n"]), *(f"{r[key]:.3f}" for key in KEYS)] for r in plain
                    if r["source"] == "all"]


def test_display_names_shorten_checkpoint_paths(tmp_path):
    named_like_rn50 = tmp_path / "RN50"
    named_like_rn50.write_bytes(b"x")  # a path only because the file exists
    names = ["RN50", "ViT-B/32", "/m/a/x.pt", "/m/b/x.pt", "/m/c/y.pt", "fusion-rrf:RN50+/m/c/y.pt", "ViT-H/14",
             str(named_like_rn50)]
    labels = display_names(names)
    assert labels == {"RN50": "RN50", "ViT-B/32": "ViT-B/32", "/m/a/x.pt": "/m/a/x.pt", "/m/b/x.pt": "/m/b/x.pt",
                      "/m/c/y.pt": "y.pt", "fusion-rrf:RN50+/m/c/y.pt": "fusion-rrf:RN50+y.pt", "ViT-H/14": "ViT-H/14",
                      str(named_like_rn50): str(named_like_rn50)}  # two x.pt stay whole; RN50 keeps its paper row
    assert checkpoints_note(labels) == '<p class="note">Checkpoint files: <code>y.pt</code>: /m/c/y.pt.</p>'
    assert checkpoints_note(display_names(["RN50", "ViT-B/32"])) == ""


def test_notes_say_what_qualifies_the_numbers(rendered):
    out, _, _, page = rendered
    text = " ".join(page.text)
    assert f"Brackets: {INTERVALS}." in text and "conditional on the gallery" in INTERVALS
    assert paired_note(_metrics(out)["paired"]) in page.text and "Holm" in paired_note(_metrics(out)["paired"])
    row = {"backbone": "RN50", "source": "all", "direction": "text_to_image", "n": 1990, "n_sampled": 2000,
           "n_unscoreable": 3}
    metrics = {"k": 100, "rows": [row, {**row, "backbone": "ViT-B/32"}], "knn": [],
               "ties": {"policy": "pessimistic", "duplicate_truths": 4}}
    notes = evaluation_notes(metrics, {"sample_note": None})
    assert notes == [
        ("Warning", "text to image: 10 of the 2000 sampled queries were left out after sampling (see the rejected "
                    "rows, translate stage)"),
        ("Warning", "text to image: 3 of the 1990 scored queries cannot be found because their image failed to "
                    "encode; they are scored as misses"),
        ("Note", "4 queries have a byte-identical copy of their true image among the candidates under another id; "
                 "these exact ties are ranked the true image last (eval.ties: pessimistic)")]
    clean = {**metrics, "rows": [{**row, "n": 2000, "n_unscoreable": 0}], "ties": {"policy": "id",
                                                                                  "duplicate_truths": 0}}
    assert evaluation_notes(clean, {}) == []


def test_notes_say_what_fine_tuned_backbones_trained_on():
    """A recorded fine-tune: what it saw and the queries left out for it (not counted as lost after sampling);
    a checkpoint without a record: its training data is unknown. Checkpoints by their display labels."""
    row = {"backbone": "/r/ft/model.pt", "source": "all", "direction": "text_to_image", "n": 1950, "n_sampled": 2000,
           "n_unscoreable": 0, "n_excluded_trained": 50}
    trained = [{"backbone": "/r/ft/model.pt", "training": "recorded", "start": "ViT-B/32", "trained_articles": 900,
                "trained_images": 880, "n_excluded_trained": 50, "trained_images_among_candidates": 40},
               {"backbone": "/x/other.pt", "training": "unknown"}]
    notes = evaluation_notes({"k": 100, "rows": [row], "knn": [], "trained": trained}, {},
                             {"/r/ft/model.pt": "ft/model.pt", "/x/other.pt": "other.pt"})
    assert notes == [
        ("Note", "ft/model.pt was fine-tuned from ViT-B/32 on 900 articles and 880 images (the record in the "
                 "checkpoint): 50 of the queries were among them and are left out; 40 of its trained images stayed "
                 "among the candidates (as distractors)"),
        ("Warning", "other.pt: its training data is unknown (the checkpoint holds no newsclip training record), so "
                    "it is scored on every query, and it may have seen some of them"),
        ("Note", "text to image: 50 of the 2000 sampled queries were left out because a fine-tuned backbone of this "
                 "job trained or validated on them (their article or their image's bytes); every backbone is scored "
                 "on the same others")]


def test_markdown_paired_table_reads_an_evaluate_from_before_holm():
    from newsclip.report.markdown import paired_table

    row = {"a": "A", "b": "B", "difference": 0.1, "lo": 0.05, "hi": 0.2, "decision": "A beats B"}
    lines = paired_table([{**row, "p_holm": 0.012}, row]).splitlines()
    assert lines[2] == "| A | B | +0.1000 | [+0.0500, +0.2000] | 0.012 | A beats B |"
    assert lines[3] == "| A | B | +0.1000 | [+0.0500, +0.2000] | – | A beats B |"


def test_training_curve_plots_every_step_and_marks_the_best_validation():
    from newsclip.report.svg import training_curve_svg

    losses = {"train_loss": [{"step": s, "loss": 3.0 / s} for s in range(1, 41)],
              "validation_loss": [{"step": s, "loss": 2.0 / s} for s in (10, 20, 30, 40)], "best_step": 30}
    svg = training_curve_svg(losses)
    train, validation = re.findall(r'<polyline points="([^"]+)"', svg)
    assert len(train.split()) == 40 and len(validation.split()) == 4
    xs = [float(p.split(",")[0]) for p in train.split()]
    ys = [float(p.split(",")[1]) for p in train.split()]
    assert xs == sorted(xs) and ys == sorted(ys)  # steps run right, the falling loss runs down the page (y grows)
    radii = re.findall(r'r="(\d)" fill="[^"]+"><title>step (\d+):', svg)
    assert {step: r for r, step in radii} == {"10": "3", "20": "3", "30": "5", "40": "3"}
