"""prepare: joins, rejects with reasons, sampling, images that cannot be decoded (checked once, in Ray tasks),
schema errors that name the file and column."""

import io
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from newsclip import articles, config
from newsclip.runtime import partitions
from newsclip.runtime.embedding_store import content_keys
from newsclip.stages import prepare
from newsclip.workers.image_check import check_images
from newsclip.workers.images import ImageDecodeError, decode_image


def _jpeg(seed: int, size: tuple[int, int] = (48, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, "PNG")
    return buffer.getvalue()


def _inputs(tmp_path, articles: list[dict], images: list[str]):
    (tmp_path / "a").mkdir()
    (tmp_path / "i").mkdir()
    pq.write_table(pa.Table.from_pylist(articles), tmp_path / "a" / "part-0.parquet")
    pq.write_table(pa.table({"image_id": images, "image": [_jpeg(i) for i in range(len(images))]}),
                   tmp_path / "i" / "part-0.parquet")
    return config.load(None, [f"input.articles={tmp_path / 'a'}", f"input.images={tmp_path / 'i'}",
                              f"output_dir={tmp_path / 'out'}", "eval.sample_size=3"])


def test_rejects_and_sample(tmp_path, ray_local):
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
    assert rejects.filter(pl.col("id") == "a0")["reason"].to_list() == [
        "duplicate article_id (an earlier row was kept)"]
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

    again = articles.sample_pairs(kept, 3, cfg.eval.seed)
    assert sorted(again) == sorted(queries["article_id"])  # seeded: the same sample every run


def test_rows_without_ids_are_rejected_as_such_not_as_duplicates(tmp_path, ray_local):
    rows = [{"article_id": None, "title": "T", "text": "b", "image_id": "i0"} for _ in range(2)]
    rows += [{"article_id": "a", "title": "T", "text": "b", "image_id": "i0"}]
    cfg = _inputs(tmp_path, rows, [None, "i0", None])
    prepare.run(cfg)
    rejects = pl.read_parquet(cfg.output / "rejects" / "prepare.parquet")
    assert sorted(zip(rejects["kind"], rejects["reason"])) == [
        ("article", "no article_id"), ("article", "no article_id"), ("image", "no image_id"), ("image", "no image_id")]
    assert pl.read_parquet(cfg.output / "prepared" / "articles.parquet")["article_id"].to_list() == ["a"]


def test_articles_are_read_in_batches_and_queries_written_per_shard(tmp_path, ray_local, monkeypatch):
    """Titles and bodies are read a batch at a time, twice (hashes, then the queries' texts): the queries must be the
    kept rows, in the input's order, with the text of the row that was kept for a duplicated id."""
    monkeypatch.setattr(articles, "ARTICLE_BATCH", 2)
    shards = [[{"article_id": f"a{i}", "title": f"T{i}", "text": f"body {i}", "image_id": f"i{i}", "lang": "en"}
               for i in range(5)],
              [{"article_id": "a1", "title": "dup", "text": "dup", "image_id": "i1", "source": "TW"},
               {"article_id": "b", "title": None, "text": "only body", "image_id": "i0", "source": "RT"},
               {"article_id": "c", "title": " ", "text": None, "image_id": "i2"}]]
    (tmp_path / "a").mkdir()
    for index, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a" / f"part-{index}.parquet")
    (tmp_path / "x").mkdir()
    cfg = _inputs(tmp_path / "x", [{"article_id": "unused"}], [f"i{i}" for i in range(5)])
    cfg = config.load(None, [f"input.articles={tmp_path / 'a'}", f"input.images={tmp_path / 'x' / 'i'}",
                             f"output_dir={tmp_path / 'out'}", "eval.sample_size=null"])
    entry = prepare.run(cfg)
    parts = sorted(p.name for p in (cfg.output / "prepared" / "queries").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet"]
    queries = pl.read_parquet(cfg.output / "prepared" / "queries")
    assert queries["article_id"].to_list() == ["a0", "a1", "a2", "a3", "a4", "b"]
    assert queries["query_text"].to_list() == [f"T{i} body {i}" for i in range(5)] + ["only body"]
    assert queries["body"][1] == "body 1" and queries["source"][-2:].to_list() == ["unknown", "RT"]
    every = pl.read_parquet(cfg.output / "prepared" / "articles_all.parquet")
    assert every["article_hash"].n_unique() == len(every) == 8 and entry["rejected"] == 2  # the second a1; c: no text
    kept = dict(every.unique("article_id", keep="first").iter_rows())  # the first a1's hash, not its duplicate's
    assert dict(zip(queries["article_id"], queries["article_hash"])) == {k: kept[k] for k in queries["article_id"]}


def test_small_data_used_whole(tmp_path, ray_local):
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
    with pytest.raises(articles.SchemaError, match=r"bad.parquet: no 'article_id' column"):
        prepare.run(cfg)


MAX_PIXELS = 10_000  # the job's bound, so that an image "too large" is a small file here
CHECK_KEY = b"newsclip.image_check"  # prepared/image_hashes.parquet's metadata: the bound its checks used
BROKEN = {"trunc-head": (_jpeg(100)[:200], "corrupt image"),  # the header, cut short
          "trunc-late": (_jpeg(101, (100, 80))[:-400], "corrupt image"),  # most of the scan: only the end is lost
          "empty": (b"", "empty image bytes"),
          "html": (b"<html>404</html>", "not a decodable image"),
          "big": (_png((120, 100)), "exceeds the bound of 10000")}


def _shard(folder, name: str, images: dict[str, bytes]) -> None:
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image_id": list(images), "image": list(images.values())}), folder / name)


def _articles(folder, name: str, image_ids: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"article_id": f"art-{i}", "title": "T", "text": f"about {i}", "image_id": i,
                                          "source": "TW"} for i in image_ids]), folder / name)


def _job(tmp_path):
    return config.load(None, [f"input.articles={tmp_path / 'a'}", f"input.images={tmp_path / 'i'}",
                              f"output_dir={tmp_path / 'out'}", "eval.sample_size=null", "eval.candidates=all",
                              f"encode.max_image_pixels={MAX_PIXELS}"])


def test_broken_images_are_rejected_with_their_articles_before_sampling(tmp_path, ray_local):
    good = {f"good-{i}": _jpeg(i) for i in range(4)}
    _shard(tmp_path / "i", "part-0.parquet", {**good, **{i: data for i, (data, _) in BROKEN.items()}})
    _articles(tmp_path / "a", "part-0.parquet", [*good, *BROKEN])
    cfg = _job(tmp_path)
    entry = prepare.run(cfg)
    out = cfg.output
    rejects = pl.read_parquet(out / "rejects" / "prepare.parquet")
    images = dict(rejects.filter(kind="image").select("id", "reason").iter_rows())
    articles = dict(rejects.filter(kind="article").select("id", "reason").iter_rows())
    assert images.keys() == BROKEN.keys()
    for image_id, (_, phrase) in BROKEN.items():
        assert phrase in images[image_id], (image_id, images[image_id])
        assert articles[f"art-{image_id}"] == f"image {image_id} cannot be decoded: {images[image_id]}"
        with pytest.raises(ImageDecodeError) as full:  # the reason encode would give, decoding in full
            decode_image(BROKEN[image_id][0], MAX_PIXELS)
        assert images[image_id] == str(full.value)
    # never a query, never a candidate: encode reads neither
    queries = pl.read_parquet(out / "prepared" / "queries")
    assert sorted(queries["image_id"]) == sorted(good)
    assert sorted(pl.read_parquet(out / "prepared" / "candidates.parquet")["image_id"]) == sorted(good)
    assert sorted(pl.read_parquet(out / "prepared" / "articles.parquet")["image_id"]) == sorted(good)
    assert (entry["images_checked"], entry["images_reused"], entry["images_broken"]) == (9, 0, 5)
    assert entry["images_in"] == 9 and entry["usable_pairs"] == 4


def test_a_second_run_decodes_only_images_it_has_not_seen(tmp_path, ray_local):
    _shard(tmp_path / "i", "part-0.parquet", {"good-0": _jpeg(0), "good-1": _jpeg(1), "empty": b""})
    _articles(tmp_path / "a", "part-0.parquet", ["good-0", "good-1", "empty"])
    cfg = _job(tmp_path)
    first = prepare.run(cfg)
    assert (first["images_checked"], first["images_reused"], first["images_broken"]) == (3, 0, 1)

    # a new shard: two new images, and known bytes under new ids (a good and an empty one): reused, not decoded
    new = {"good-2": _jpeg(2, (64, 64)), "trunc": _jpeg(3)[:300], "copy-of-good-0": _jpeg(0), "empty-again": b""}
    _shard(tmp_path / "i", "part-1.parquet", new)
    _articles(tmp_path / "a", "part-1.parquet", list(new))
    second = prepare.run(cfg)
    assert (second["images_checked"], second["images_reused"], second["images_broken"]) == (2, 5, 3)
    rejects = pl.read_parquet(cfg.output / "rejects" / "prepare.parquet")
    reasons = dict(rejects.filter(kind="image").select("id", "reason").iter_rows())
    assert reasons == {"empty": "empty image bytes", "empty-again": "empty image bytes", "trunc": reasons["trunc"]}
    assert reasons["trunc"].startswith("corrupt image")
    queries = pl.read_parquet(cfg.output / "prepared" / "queries")
    assert sorted(queries["image_id"]) == ["copy-of-good-0", "good-0", "good-1", "good-2"]

    third = prepare.run(cfg)  # nothing changed: no shard is read
    assert (third["images_checked"], third["images_reused"], third["images_broken"]) == (0, 7, 3)

    # another bound: last run's checks do not hold
    bounded = config.load(None, [f"input.articles={tmp_path / 'a'}", f"input.images={tmp_path / 'i'}",
                                 f"output_dir={tmp_path / 'out'}", "eval.sample_size=null",
                                 "encode.max_image_pixels=4000"])
    fourth = prepare.run(bounded)
    # every row decoded again (a hash in both shards, once in each shard's task); good-2 is too large now
    assert (fourth["images_checked"], fourth["images_broken"]) == (7, 4)


def test_image_hashes_from_before_the_check_are_no_cache(tmp_path, ray_local):
    _shard(tmp_path / "i", "part-0.parquet", {"good-0": _jpeg(0), "trunc": _jpeg(3)[:300]})
    _articles(tmp_path / "a", "part-0.parquet", ["good-0", "trunc"])
    cfg = _job(tmp_path)
    prepare.run(cfg)
    hashes = cfg.output / "prepared" / "image_hashes.parquet"
    assert json.loads(pq.read_schema(hashes).metadata[CHECK_KEY]) == {"max_image_pixels": MAX_PIXELS}
    old = pq.read_table(hashes).drop_columns(["error"]).replace_schema_metadata(None)  # as an older prepare wrote it
    pq.write_table(old, hashes)
    entry = prepare.run(cfg)
    assert (entry["images_checked"], entry["images_reused"], entry["images_broken"]) == (2, 0, 1)
    assert entry["changes"]["images"] == {"seen": 2, "new": 0, "changed": 0, "deleted": 0}


def test_check_task_reuses_known_hashes_and_decodes_a_new_hash_once(tmp_path):
    data = {"a": _jpeg(0), "b": _jpeg(0), "c": _jpeg(1), "d": b"\xff\xd8junk"}
    _shard(tmp_path, "s.parquet", data)
    known = pa.table({"image_hash": [content_keys([_jpeg(1)])[0].as_py()], "error": pa.array(["stale"])})
    rows = check_images(str(tmp_path / "s.parquet"), [0], known, MAX_PIXELS).to_pylist()
    assert [r["image_id"] for r in rows] == list(data)
    assert [r["checked"] for r in rows] == [True, False, False, True]  # b: a's bytes; c: known
    assert [r["error"] for r in rows][:3] == [None, None, "stale"]
    assert rows[3]["error"].startswith("corrupt image") or rows[3]["error"].startswith("not a decodable")
    assert rows[0]["image_hash"] == rows[1]["image_hash"] == content_keys([_jpeg(0)])[0].as_py()


def test_check_worker_imports_neither_polars_nor_faiss():
    import subprocess
    import sys

    code = ("import sys, newsclip.workers.image_check; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'polars', 'faiss'}))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_has_text_agrees_with_the_joined_text():
    values = [None, "", " ", "\t\n", "\u00a0", "\u3000", "\u200b", "x", " x ", "\u00a0y"]
    frame = pl.DataFrame({"title": [t for t in values for _ in values], "text": [b for _ in values for b in values]})
    for mode in ("title", "body", "title_body"):
        joined = frame.select(articles.join_text(mode).fill_null("") != "").to_series()
        assert frame.select(articles.has_text(mode)).to_series().to_list() == joined.to_list(), mode


def test_a_shard_that_changes_between_the_two_reads_stops_prepare(tmp_path, ray_local, monkeypatch):
    rows = [{"article_id": f"a{i}", "title": f"T{i}", "text": "b", "image_id": f"i{i}"} for i in range(3)]
    cfg = _inputs(tmp_path, rows, [f"i{i}" for i in range(3)])
    reads, original = [], articles.shard_batches

    def rewritten_on_second_read(path):
        reads.append(path)
        for frame in original(path):  # the second read finds other ids at the same rows
            yield frame if len(reads) == 1 else frame.with_columns(pl.col("article_id") + "-new")

    monkeypatch.setattr(articles, "shard_batches", rewritten_on_second_read)
    with pytest.raises(ValueError, match=r"part-0.parquet: the shard changed while prepare read it"):
        prepare.run(cfg)
    assert len(reads) == 2 and not (cfg.output / "prepared").exists()


def test_the_outputs_do_not_depend_on_the_partitions(tmp_path, monkeypatch):
    """prepare's de-duplication, joins, change counts and sample give the same files (byte for byte) and facts
    whether the work is one partition or spread over many hash partitions and id ranges."""
    rng = np.random.default_rng(4)
    rows = [{"article_id": None if k % 17 == 0 else f"a{rng.integers(0, 40)}", "title": f"T{k}" if k % 11 else " ",
             "text": f"b{k % 3}", "image_id": f"i{rng.integers(0, 14)}", "source": None if k % 5 else "TW"}
            for k in range(60)]
    cfg = _inputs(tmp_path, rows, [f"i{i}" for i in range(12)] + ["i3"])
    (tmp_path / "a" / "part-1.parquet").write_bytes((tmp_path / "a" / "part-0.parquet").read_bytes())
    outputs = {}
    for part_rows in (250_000, 4):
        monkeypatch.setattr(partitions, "PART_ROWS", part_rows)
        monkeypatch.setattr(partitions, "SAMPLE_EVERY", 2 if part_rows == 4 else 512)  # ids enough to cut id ranges
        monkeypatch.setattr(partitions, "OUT_ROWS", 8 if part_rows == 4 else 32_768)  # and input-position ranges
        for night in (False, True):  # a night's change counts against the first run's files
            if night:
                pq.write_table(pa.Table.from_pylist(rows[::2]), tmp_path / "a" / "part-1.parquet")
            else:
                cfg = config.load(None, [f"input.articles={tmp_path / 'a'}", f"input.images={tmp_path / 'i'}",
                                         f"output_dir={tmp_path / str(part_rows)}", "eval.sample_size=9",
                                         "eval.candidates=sample"])
            entry = prepare.run(cfg)
            files = sorted(p for p in cfg.output.rglob("*.parquet") if "prepared" in p.parts or "rejects" in p.parts)
            outputs[part_rows, night] = ({p.relative_to(cfg.output): p.read_bytes() for p in files},
                                         {k: v for k, v in entry.items() if k not in ("committed_at", "seconds")})
        (tmp_path / "a" / "part-1.parquet").write_bytes((tmp_path / "a" / "part-0.parquet").read_bytes())
    assert outputs[4, False] == outputs[250_000, False] and outputs[4, True] == outputs[250_000, True]
    assert outputs[4, True][1]["changes"]["articles"]["seen"] > 0
