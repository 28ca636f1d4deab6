"""report.md and report.html of a real demo run: demo-tiny, a random-weight CLIP checkpoint and their fusion."""

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image
from test_backbones import tiny_clip
from test_report_html import parse

from newsclip.cli import main
from newsclip.demo.data import write_demo_data
from newsclip.names import fusion_name
from newsclip.report.svg import PALETTE

pytestmark = pytest.mark.slow  # a whole job: `pytest -m 'not slow'` leaves it out

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "demo.yaml")
ARTICLES = 200
CLIP_VOCAB = 49408  # clip.tokenize's ids run up to 49407: a checkpoint that encodes real text needs them all
# one thumbnail in an example: its class (hit: the correct image in the top 5; truth: shown apart) and image id
THUMB = r'<div class="(thumb(?: hit| truth)?)">.*?<span class="meta">([^<]+)</span></div>'
LABELS = ["demo-tiny", "random-rn.pt", "fusion:demo-tiny+random-rn.pt"]  # how the HTML names the three


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, demo_tiny, ray_local):
    """`newsclip run` of the demo job on 200 articles: demo-tiny, a CLIP that never saw data, their z-mean fusion."""
    root = tmp_path_factory.mktemp("report-real")
    checkpoint = root / "models" / "random-rn.pt"
    checkpoint.parent.mkdir()
    torch.save(tiny_clip("resnet", vocab=CLIP_VOCAB).state_dict(), checkpoint)
    write_demo_data(root / "data", articles=ARTICLES, seed=1)
    names = ["demo-tiny", str(checkpoint), fusion_name(["demo-tiny", str(checkpoint)])]
    overrides = {"input.articles": str(root / "data" / "articles"), "input.images": str(root / "data" / "images"),
                 "output_dir": str(root / "output"), "backbones": json.dumps(names[:2]),
                 "fusion": json.dumps(names[2:]), "translate.enabled": "false", "eval.bootstrap": "200",
                 # the two backbones encode side by side (in this process: 200 articles are under ray.inline_rows)
                 "encode.parallel_backbones": "2"}
    # no translation (its package takes ~90 s to build): the German articles stay German, demo-tiny misses them
    assert main(["run", JOB, *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]]) == 0
    return root / "output", names


@pytest.fixture(scope="module")
def page(real_run):
    out, _ = real_run
    document = (out / "report.html").read_text()
    return document, parse(document)


def _overall(out: Path) -> pl.DataFrame:
    metrics = pl.read_csv(out / "metrics.csv")
    return metrics.filter((pl.col("source") == "all") & (pl.col("direction") == "text_to_image"))


def _chance_mrr(candidates: int, k: int = 100) -> float:
    """Expected MRR@k of a uniformly random ranking of `candidates` images."""
    return sum(1 / r for r in range(1, min(k, candidates) + 1)) / candidates


def test_html_table_equals_metrics_csv_with_intervals(real_run, page):
    out, names = real_run
    _, parsed = page
    overall = _overall(out)
    assert overall["backbone"].to_list() == names
    header, *rows = parsed.tables["All backbones (text to image)"]
    assert header[:3] == ["backbone", "n", "MRR@100"] and header[-1] == "R@100"
    assert [r[0] for r in rows] == LABELS  # the checkpoint by its file name, also inside the fusion's name
    for row, expected in zip(rows, overall.iter_rows(named=True), strict=True):
        assert row[1] == str(expected["n"])
        for cell, key in zip(row[2:], ["mrr", "recall@1", "recall@5", "recall@10", "recall@20", "recall@50",
                                       "recall@100"], strict=True):
            assert cell == f"{expected[key]:.3f} [{expected[f'{key}_lo']:.3f}, {expected[f'{key}_hi']:.3f}]", key
    # the full path is on the page, once, beside its short name
    assert re.sub(r"<[^>]+>", "", page[0]).count(f"Checkpoint files: random-rn.pt: {names[1]}.") == 1
    reverse = parsed.tables["Image to text (which article is this image for)"]
    assert [r[0] for r in reverse[1:]] == LABELS
    for label in LABELS:  # a per-source table under each name
        assert [r[0] for r in parsed.tables[label][1:]] == ["RSS", "RT", "TW"]


def test_report_md_rows_equal_metrics_csv(real_run):
    out, names = real_run
    report = (out / "report.md").read_text()
    overall = _overall(out)
    section = report.split("## All sources", 1)[1].split("##", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| backbone")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines] == names  # markdown keeps full names
    for line, row in zip(lines, overall.iter_rows(named=True), strict=True):
        assert line.startswith(f"| {row['backbone']} | {row['n']} | {row['mrr']:.3f} | {row['recall@1']:.3f} | "
                               f"{row['recall@5']:.3f} |")
    for name in names:
        assert f"### {name}\n" in report


def test_random_checkpoint_scores_like_chance_and_loses_the_paired_comparison(real_run, page):
    out, names = real_run
    overall = {r["backbone"]: r for r in _overall(out).iter_rows(named=True)}
    tiny, random_ckpt, fused = (overall[n] for n in names)
    chance = _chance_mrr(tiny["n"])  # candidates = the sampled images, one per article
    assert random_ckpt["mrr"] < 2 * chance < tiny["mrr"] / 10
    assert random_ckpt["mrr_lo"] <= chance <= random_ckpt["mrr_hi"]
    assert tiny["mrr_lo"] > random_ckpt["mrr_hi"]
    assert random_ckpt["mrr"] < fused["mrr"] < tiny["mrr"]  # averaging in noise costs demo-tiny, but not all of it

    paired = json.loads((out / "metrics.json").read_text())["paired"]
    first = next(p for p in paired if (p["a"], p["b"], p["direction"]) == (names[0], names[1], "text_to_image"))
    assert first["decision"] == "A beats B" and first["lo"] > 0
    _, parsed = page
    rows = parsed.tables["Paired comparisons"][1:]
    label = dict(zip(names, LABELS, strict=True))
    # every pair of the three, each with its difference and decision
    assert [(r[0], r[1], r[3], r[-1]) for r in rows] == [(label[p["a"]], label[p["b"]], f"{p['difference']:+.4f}",
                                                          p["decision"]) for p in paired
                                                         if p["direction"] == "text_to_image"]
    assert len(rows) == 3 and rows[0][:2] == LABELS[:2] and rows[0][-1] == "A beats B"


def test_cost_table_from_manifest(real_run, page):
    out, names = real_run
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    encode = {name: {side: stages[f"encode:{slug}:{side}"] for side in ("images", "texts")}
              for name, slug in zip(names[:2], ["demo-tiny", "random-rn"])}
    mrr = dict(zip(_overall(out)["backbone"], _overall(out)["mrr"]))
    _, parsed = page
    header, *rows = parsed.tables["Cost against quality"]
    assert header[:3] == ["backbone", "images", "image encode s"] and header[-1] == "MRR"
    # each backbone's cell: its label, then how the encode stage loaded it (a fusion has no model of its own)
    assert [r[0].split(" ", 1)[0] for r in rows] == LABELS
    for row, slug in zip(rows, ["demo-tiny", "random-rn"]):
        assert row[0].startswith(f"{row[0].split(' ', 1)[0]} clip; ") and "resize to 64x64" in row[0], row[0]
        assert stages[f"encode:{slug}:images"]["model"] in row[0]
    assert rows[2][0] == LABELS[2]
    # the runner's clock splits the encode stage between the entries of each backbone (side by side: one thread
    # each): a backbone's two sides take some of the stage's time, never more than all of it
    stage_seconds = json.loads((out / "manifest.json").read_text())["runs"][-1]["stages"]["encode"]["seconds"]
    for row, name in zip(rows, names[:2]):
        images, texts = encode[name]["images"], encode[name]["texts"]
        assert images["seconds"] > 0 and texts["seconds"] > 0
        assert images["seconds"] + texts["seconds"] <= stage_seconds + 0.1, (images, texts, stage_seconds)
        assert row[1:3] == [str(images["rows"]), f"{images['seconds']:.1f}"]
        assert row[4:6] == [str(texts["rows"]), f"{texts['seconds']:.1f}"]
        assert row[-1] == f"{mrr[name]:.3f}"
    fused_images = sum(encode[n]["images"]["seconds"] for n in names[:2])  # a fusion costs both encoders
    assert rows[2][2] == f"{fused_images:.1f}" and rows[2][-1] == f"{mrr[names[2]]:.3f}"


def test_examples_show_the_best_backbones_top5_with_the_correct_image_marked(real_run, page):
    out, _ = real_run
    document, parsed = page
    assert "<h2>Examples (demo-tiny)</h2>" in document  # the best MRR
    truth = dict(pl.read_parquet(out / "prepared" / "queries").select("article_id", "image_id").iter_rows())
    ranked = pl.read_parquet(out / "rankings" / "demo-tiny.parquet")
    top5 = {a: ids[:5] for a, ids in zip(ranked["article_id"].to_list(), ranked["image_ids"].to_list())}
    examples = document.split('<div class="example">')[1:]
    assert len(examples) == 5
    ranks_seen = []
    for chunk in examples:
        article = re.search(r"article (art-\d+) ·", chunk).group(1)
        thumbs = re.findall(THUMB, chunk)
        assert [image for _, image in thumbs[:5]] == top5[article]  # in ranking order
        hits = [image for css, image in thumbs if css == "thumb hit"]
        if truth[article] in top5[article]:
            assert hits == [truth[article]] and len(thumbs) == 5
            ranks_seen.append(top5[article].index(truth[article]) + 1)
        else:  # shown after the top 5, framed as the truth
            assert hits == [] and thumbs[5] == ("thumb truth", truth[article])
            ranks_seen.append(0)
    assert 1 in ranks_seen and any(r > 1 for r in ranks_seen)  # a hit at rank 1 and one elsewhere (or missed)
    pictures = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
    assert len(pictures) >= 25
    for src in pictures:
        assert src.startswith("data:image/jpeg;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).format == "JPEG"


def test_plots_inline_and_page_self_contained(real_run, page):
    document, parsed = page
    assert parsed.count("svg") == 3  # Recall@K, MRR per source, cost against quality
    assert parsed.count("polyline") == 3  # a curve each; no paper curve for these
    assert "(paper)" not in document and "dashed)" not in document.split("<h2>Examples")[0]  # nor paper rows
    circles = parsed.count("circle")
    assert circles == 3 * 6 + 3  # a point per backbone and K (1 to 100), then a point per backbone in the cost plot
    svgs = re.findall(r"<svg.*?</svg>", document, flags=re.S)
    for label in LABELS:  # each plot names every backbone (legend or point label)
        assert all(f">{label}</text>" in svg for svg in svgs), label
    assert not any(tag in ("script", "link", "iframe", "object", "embed") for tag, _ in parsed.tags)
    for tag, attrs in parsed.tags:
        for key, value in attrs.items():
            assert not key.startswith("on"), (tag, key)
            assert not (value or "").lower().startswith(("http:", "https:", "//", "file:")), (tag, key, value)
    text_only = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", document)
    assert "http" not in text_only and "url(" not in text_only and "@import" not in text_only


@pytest.mark.skipif(not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
                    reason="headless Chromium is not installed")
def test_screenshot_renders_tables_plots_and_thumbnails(real_run, tmp_path):
    out, _ = real_run
    png = tmp_path / "report.png"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report_screenshot.py"), str(out),
                           "--png", str(png)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(png)
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 4000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 1000  # text, plots and thumbnails: not a blank or error page
    present = {rgb for _, rgb in colours}
    for hex_colour in [*PALETTE[:3], "#2ca02c"]:  # the three series' swatches and bars, the correct image's frame
        assert tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)) in present, hex_colour
