"""prepare: joins, rejects with reasons, sampling, schema errors that name the file and column."""

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from newsclip import config, prepare


def _inputs(tmp_path, articles: list[dict], images: list[str]):
    (tmp_path / "a").mkdir()
    (tmp_path / "i").mkdir()
    pq.write_table(pa.Table.from_pylist(articles), tmp_path / "a" / "part-0.parquet")
    pq.write_table(pa.table({"image_id": images, "image": [b"x"] * len(images)}), tmp_path / "i" / "part-0.parquet")
    return config.load(None, [f"input.articles={tmp_path / 'a'}", f"input.images={tmp_path / 'i'}",
                              f"output_dir={tmp_path / 'out'}", "eval.sample_size=3"])


def test_rejects_and_sample(tmp_path):
    rows = [{"article_id": f"a{i}", "title": f"T{i}", "text": f"body {i}", "image_id": f"i{i}", "source": "TW"}
            for i in range(6)]
    rows += [{"article_id": "a0", "title": "dup", "text": "dup", "image_id": "i0", "source": "TW"},
             {"article_id": "notext", "title": " ", "text": None, "image_id": "i1", "source": "TW"},
             {"article_id": "noimg", "title": "T", "text": "b", "image_id": None, "source": "TW"},
             {"article_id": "lost", "title": "T", "text": "b", "image_id": "gone", "source": None}]
    cfg = _inputs(tmp_path, rows, [f"i{i}" for i in range(6)] + ["i0", "orphan"])
    entry = prepare.run(cfg)
    out = cfg.output
    rejects = pl.read_parquet(out / "rejects" / "prepare.parquet")
    reasons = dict(zip(rejects["id"], rejects["reason"]))
    assert reasons["notext"].startswith("no text")
    assert reasons["noimg"] == "no image_id"
    assert reasons["lost"] == "image_id not found in input.images"
    assert rejects.filter(pl.col("id") == "a0")["reason"].to_list() == ["duplicate article_id (an earlier row was kept)"]
    assert rejects.filter(pl.col("id") == "i0")["kind"].to_list() == ["image"]

    kept = pl.read_parquet(out / "prepared" / "articles.parquet")
    queries = pl.read_parquet(out / "prepared" / "queries")
    images = pl.read_parquet(out / "prepared" / "candidates.parquet")
    # every input row is accounted for: kept or rejected
    assert len(kept) + (rejects["kind"] == "article").sum() == len(rows)
    assert len(images) + (rejects["kind"] == "image").sum() == 8
    assert len(queries) == 3 and kept["in_eval"].sum() == 3
    assert queries["query_text"][0] == f"T{queries['article_id'][0][1:]} body {queries['article_id'][0][1:]}"
    # candidates: the sampled pairs' images only
    assert sorted(images.filter("candidate")["image_id"]) == sorted(queries["image_id"])
    assert entry["queries"] == 3 and entry["sample_note"] is None

    again = prepare.sample_pairs(kept, 3, cfg.eval.seed)
    assert sorted(again) == sorted(queries["article_id"])  # seeded: the same sample every run


def test_rows_without_ids_are_rejected_as_such_not_as_duplicates(tmp_path):
    rows = [{"article_id": None, "title": "T", "text": "b", "image_id": "i0"} for _ in range(2)]
    rows += [{"article_id": "a", "title": "T", "text": "b", "image_id": "i0"}]
    cfg = _inputs(tmp_path, rows, [None, "i0", None])
    prepare.run(cfg)
    rejects = pl.read_parquet(cfg.output / "rejects" / "prepare.parquet")
    assert sorted(zip(rejects["kind"], rejects["reason"])) == [
        ("article", "no article_id"), ("article", "no article_id"), ("image", "no image_id"), ("image", "no image_id")]
    assert pl.read_parquet(cfg.output / "prepared" / "articles.parquet")["article_id"].to_list() == ["a"]


def test_small_data_used_whole(tmp_path):
    rows = [{"article_id": "a", "title": "t", "text": "b", "image_id": "i"}]
    cfg = _inputs(tmp_path, rows, ["i"])
    entry = prepare.run(cfg)
    assert "fewer than eval.sample_size=3" in entry["sample_note"]


def test_schema_error_names_file_and_column(tmp_path):
    (tmp_path / "a").mkdir()
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "a" / "bad.parquet")
    (tmp_path / "x").mkdir()
    cfg = _inputs(tmp_path / "x", [{"article_id": "a"}], ["i"])
    cfg = config.load(None, [f"input.articles={tmp_path / 'a'}", f"input.images={tmp_path / 'x' / 'i'}",
                             f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(prepare.SchemaError, match=r"bad.parquet: no 'article_id' column"):
        prepare.run(cfg)
