"""Nightly runs through the CLI: a full run, then 5% new articles, 1% changed and two deleted; the nightly run
encodes and translates only those, its rankings equal a full run's, a rerun changes nothing, and new weights
re-encode everything."""

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from newsclip.cli import main
from newsclip.demo.data import append_demo_data, write_demo_data
from newsclip.runtime.embedding_store import content_keys

pytestmark = pytest.mark.slow  # a whole job: `pytest -m 'not slow'` leaves it out

NIGHTLY = Path(__file__).resolve().parents[1] / "jobs" / "nightly.yaml"
ARTICLES, NEW, CHANGED = 400, 20, 4  # 5% new, 1% changed
DELETED = ["art-000010", "art-000011"]


def _job(root: Path, output: str, weights: Path, **more) -> list[str]:
    """`newsclip run jobs/nightly.yaml` pointed at the test's archive, output folder and checkpoint."""
    settings = {"input.articles": root / "data" / "articles", "input.images": root / "data" / "images",
                "output_dir": root / output, "backbones": f"[{weights}]", "eval.bootstrap": 50, **more}
    return ["run", str(NIGHTLY), *(a for key, value in settings.items() for a in ("--set", f"{key}={value}"))]


def _last_run(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())["runs"][-1]


def _entry(output: Path, name: str) -> dict:
    return json.loads((output / "manifest.json").read_text())["stages"][name]


def _query_hashes(output: Path) -> set[str]:
    texts = pq.read_table(output / "translated", columns=["query_text"]).column("query_text").to_pylist()
    return set(content_keys(texts).to_pylist())


def _change_and_delete(articles: Path) -> list[str]:
    """Edit the body of CHANGED articles and drop DELETED from the first shard, in place."""
    path = articles / "part-00000.parquet"
    table = pq.read_table(path)
    texts, ids = table.column("text").to_pylist(), table.column("article_id").to_pylist()
    changed = [i for i, t in enumerate(texts) if t and ids[i] not in DELETED][:CHANGED]
    for i in changed:
        texts[i] += " Updated overnight with a correction."
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    pq.write_table(table.filter(pc.invert(pc.is_in(table.column("article_id"), value_set=pa.array(DELETED)))), path)
    return [ids[i] for i in changed]


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, demo_tiny, packages_dir, ray_local):
    root = tmp_path_factory.mktemp("nightly")
    weights = root / "weights" / "tiny.pt"  # a checkpoint path of our own, so it can be "retrained" below
    weights.parent.mkdir()
    shutil.copy(demo_tiny, weights)
    write_demo_data(root / "data", ARTICLES, seed=3)
    job = _job(root, "out", weights)
    assert main(job) == 0  # the first run
    first = {"texts": _query_hashes(root / "out"), "run": _last_run(root / "out")}
    append_demo_data(root / "data", NEW, seed=4)
    changed = _change_and_delete(root / "data" / "articles")
    assert main(job) == 0  # the small night: its image check, translation and encoding in the driver's process
    # every run here is under ray.inline_rows, in this process: the pools' work equals it bit for bit (the chaos
    # tests hold that), and a run that starts pools costs ~30 s more on 2 CPUs
    full = _job(root, "full", weights)
    assert main(full) == 0
    return root, job, first, changed


def test_first_run_encodes_everything(nightly):
    root, _, first, _ = nightly
    encode = first["run"]["stages"]["encode"]
    assert encode["reused"] == 0 and encode["encoded"] > ARTICLES  # texts and images
    assert first["run"]["stages"]["prepare"]["changes"]["articles"]["new"] == ARTICLES


def test_nightly_encodes_and_translates_only_new_and_changed_rows(nightly):
    root, _, first, changed = nightly
    out = root / "out"
    run = _last_run(out)
    assert run["status"] == "finished"
    assert run["stages"]["prepare"]["changes"]["articles"] == {
        "seen": ARTICLES + NEW - len(DELETED), "new": NEW, "changed": CHANGED, "deleted": len(DELETED)}
    new_texts = _query_hashes(out) - first["texts"]
    assert 0 < len(new_texts) <= NEW + CHANGED
    assert _entry(out, "encode:tiny:texts")["encoded"] == len(new_texts)
    assert _entry(out, "encode:tiny:texts")["in_process"]  # a small night starts no pool
    new_images = run["stages"]["prepare"]["changes"]["images"]["new"]
    assert new_images >= NEW * 0.9 and _entry(out, "encode:tiny:images")["encoded"] == new_images
    translate = run["stages"]["translate"]
    queries = pl.read_parquet(out / "prepared" / "queries")
    fresh = queries.filter(pl.col("article_id").is_in([*changed, *[f"art-{ARTICLES + i:06d}" for i in range(NEW)]]))
    assert translate["new"] == len(fresh) and translate["reused"] == len(queries) - len(fresh)


def test_nightly_rankings_equal_a_full_run(nightly):
    root = nightly[0]
    # text to image: most articles merge their last top-k with the new images; new and changed ones are searched.
    # Image to text: an image whose top-100 (of ~400 articles) held a deleted or changed article is searched again.
    for direction, share in (("text_to_image", 0.8), ("image_to_text", 0.05)):
        entry = _entry(root / "out", f"knn:tiny:{direction}")
        assert entry["merged"] > share * entry["queries"] and entry["searched_in_full"] > 0
        assert _entry(root / "full", f"knn:tiny:{direction}")["merged"] == 0
    for name in ("tiny.parquet", "tiny.image_to_text.parquet"):
        nightly_ranks = pq.read_table(root / "out" / "rankings" / name)
        full_ranks = pq.read_table(root / "full" / "rankings" / name)
        key = nightly_ranks.column_names[0]
        assert nightly_ranks.sort_by(key).equals(full_ranks.sort_by(key))  # ids and scores, bit for bit
    ranked = pq.read_table(root / "out" / "rankings" / "tiny.parquet").column("article_id").to_pylist()
    assert not set(DELETED) & set(ranked) and f"art-{ARTICLES:06d}" in ranked
    assert (root / "out" / "metrics.csv").read_text() == (root / "full" / "metrics.csv").read_text()


def test_rerun_changes_nothing(nightly):
    root, job, _, _ = nightly
    out = root / "out"
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")
              if p.is_file() and p.name != "manifest.json" and "runs" not in p.parts and "logs" not in p.parts}
    assert main(job) == 0
    assert {s["status"] for s in _last_run(out)["stages"].values()} == {"up to date"}
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in before}
    assert after == before and before.keys() == {p for p in out.rglob("*") if p.is_file() and p.name !=
                                                 "manifest.json" and "runs" not in p.parts and "logs" not in p.parts}


def test_new_weights_reencode_everything(nightly):
    import torch

    root, job, _, _ = nightly
    out = root / "out"
    weights = root / "weights" / "tiny.pt"
    state = torch.load(weights, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 0.5  # retrained: another file, another checkpoint id
    torch.save(state, weights)
    assert main(job) == 0
    run = _last_run(out)
    assert run["stages"]["prepare"]["status"] == "up to date" and run["stages"]["encode"]["status"] == "done"
    assert run["stages"]["encode"]["reused"] == 0 and run["stages"]["encode"]["encoded"] > ARTICLES
    assert _entry(out, "encode:tiny:images")["store"] != _entry(root / "full", "encode:tiny:images")["store"]
    assert _entry(out, "knn:tiny:text_to_image")["merged"] == 0  # other embeddings: every query searched again
