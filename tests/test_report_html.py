"""report.html for a synthetic two-backbone output folder (plus a fusion): content, self-containment, escaping."""

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from PIL import Image

from newsclip.names import fusion_name, slug
from newsclip.report.html import checkpoints_note, display_names, render_html, write_html
from newsclip.retrieval.bootstrap import ci_rows, paired_rows
from newsclip.retrieval.metrics import scores
from newsclip.runtime.store import write_table, write_text
from newsclip.stages.evaluate import query_ranks
from newsclip.stages.knn import fuse_stage

HOSTILE_TITLE = "<script>alert('x')</script> Flood & storm \"warning\""
K = 10


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
            rank = [1, 3, 0, 2, 1, 7][(i + b) % 6] if i else 1  # truth at rank 1, 3, absent, ...
            if rank:
                others.insert(rank - 1, image_ids[i])
            lists.append(others[:K])
            score_lists.append(sorted(rng.uniform(0.1, 0.4, K).tolist(), reverse=True))
        write_table(pl.DataFrame({"article_id": articles, "image_ids": lists, "scores": score_lists},
                                 schema={"article_id": pl.String, "image_ids": pl.List(pl.String),
                                         "scores": pl.List(pl.Float32)}).to_arrow(),
                    out / "rankings" / f"{slug(backbone)}.parquet")
    cfg = SimpleNamespace(name="html-test", output=out, eval=SimpleNamespace(k=K),
                          input=SimpleNamespace(images=str(data)))
    fused = fusion_name(list(backbones), "rrf")
    fuse_stage(cfg, fused)
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
    """Every start tag with its attributes, and the text (unescaped) per innermost element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.tags if t == tag)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out, cfg = build_output(tmp_path_factory.mktemp("report"))
    document = render_html(out, cfg)
    page = Page()
    page.feed(document)
    return out, cfg, document, page


def test_tables_numbers_and_paper_rows(rendered):
    out, cfg, _, page = rendered
    text = " ".join(page.text)
    metrics = json.loads((out / "metrics.json").read_text())
    for row in metrics["rows"]:
        if row["source"] == "all":
            assert f"{row['mrr']:.3f}" in text
            assert f"[{row['mrr_lo']:.3f}, {row['mrr_hi']:.3f}]" in text
    for name in cfg.backbones:
        assert name in text
    assert "RN50 (paper)" in text and "0.388" in text and "ViT-B/32 (paper)" in text and "0.384" in text
    assert f"backbone n MRR@{K} R@1 R@5 R@10 " in text
    assert "R@20" not in text and "R@100" not in text  # with k=10 a recall@100 would really be recall@10
    assert page.count("table") >= 5  # overall, per source x3, paired, cost, rejects
    assert "A beats B" in text or "no significant difference" in text
    assert "no text" in text  # the rejects summary
    assert "3.00" in text  # GPU memory of ViT-B/32 in GiB


def test_plots_are_inline_svg(rendered):
    page = rendered[3]
    assert page.count("svg") == 3  # Recall@K curves, MRR per source, cost against quality
    assert page.count("polyline") == 3 + 2  # a curve per backbone (fusion included), the paper's for RN50 and ViT-B/32
    assert any(attrs.get("stroke-dasharray") for tag, attrs in page.tags if tag == "polyline")
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
    page = Page()
    page.feed(path.read_text())
    assert path == out / "report.html"
    assert sum(1 for t, a in page.tags if t == "img") >= 5  # found by scanning input.images


def test_renders_without_intervals_or_config(tmp_path):
    out, _ = build_output(tmp_path, n=12)
    metrics = json.loads((out / "metrics.json").read_text())
    plain = [{k: v for k, v in r.items() if not k.endswith(("_lo", "_hi"))} for r in metrics["rows"]]
    write_text(out / "metrics.json", json.dumps({"k": K, "rows": plain}))
    document = render_html(out, None, examples=1)
    assert "<svg" in document and "95% bootstrap" not in document
    assert f"{scores(np.array([1]), K)['mrr']:.3f}" in document  # formats render


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
    from newsclip.report.html import evaluation_notes

    _, _, document, _ = rendered
    assert "conditional on the gallery" in document and "Holm" in document
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
