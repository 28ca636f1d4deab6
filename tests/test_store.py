"""`newsclip store compact|stats`: compaction keeps exactly the rows of the job's last runs, a crash inside it loses
no needed row, stats lists folders and runs; and over nights that delete articles, a nightly run after compaction
encodes nothing and ranks as a full run does."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from newsclip.cli import main
from newsclip.names import encode_entry
from newsclip.runtime import store_maintenance
from newsclip.runtime.embedding_store import EmbeddingStore, content_key, store_refs, write_refs
from newsclip.runtime.store import record_stage, vectors_of

CHECKPOINT = "0123456789abcdef"  # a checkpoint id (16 hex digits) for the hand-made stores


def _vector(key: str) -> list[float]:
    return (np.frombuffer(bytes.fromhex(key), np.uint8)[:8] / 255).astype(np.float32).tolist()


def _store(out: Path, side: str) -> EmbeddingStore:
    return EmbeddingStore(out / "store", "demo-tiny", CHECKPOINT, "fp32", side)


def _night(out: Path, run_id: str, contents: dict[str, list[str]]) -> None:
    """What a run does to the store and its records, by hand: encode stores the contents it has not seen and
    records the rows it uses; the runner copies them into the run's record."""
    for side, values in contents.items():
        store, keys = _store(out, side), [content_key(v) for v in values]
        stored = set(pa.concat_arrays(store.hashes()).to_pylist()) if store.parts() else set()
        new = [k for k in keys if k not in stored]
        if new:
            store.append(pa.table({"hash": new, "embedding": [_vector(k) for k in new], "error": [None] * len(new)},
                                  schema=pa.schema([("hash", pa.string()), ("embedding", pa.list_(pa.float32(), 8)),
                                                    ("error", pa.string())])))
        record_stage(out, encode_entry("demo-tiny", side), [], backbone="demo-tiny", store=str(store.dir),
                     refs=write_refs(out, store, pa.array(keys, pa.string())))
    (out / "runs").mkdir(exist_ok=True)
    record = {"run_id": run_id, "status": "finished", "stages": {"encode": {"status": "done"}},
              "store_refs": store_refs(out, ["demo-tiny"])}
    (out / "runs" / f"{run_id}.json").write_text(json.dumps(record))


NIGHTS = [  # article texts and images per night: a deleted, then b deleted and d added
    {"texts": ["a", "b", "c"], "images": ["A", "B", "C"]},
    {"texts": ["b", "c"], "images": ["B", "C"]},
    {"texts": ["c", "d"], "images": ["C", "D"]},
]


@pytest.fixture
def job(tmp_path) -> tuple[Path, list[str]]:
    """Three nights of a hand-made job; the job file and `--set` for the CLI."""
    out = tmp_path / "out"
    for i, contents in enumerate(NIGHTS):
        _night(out, f"2026010{i + 1}T020000Z-00000{i}", contents)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"input: {{articles: a, images: i}}\noutput_dir: {out}\nbackbones: [demo-tiny]\n")
    return out, [str(job_file)]


def _stored(out: Path, side: str) -> list[str]:
    store = _store(out, side)
    return sorted(pa.concat_arrays(store.hashes()).to_pylist()) if store.parts() else []


def _keys(values: list[str]) -> list[str]:
    return sorted(content_key(v) for v in values)


def _lookup(out: Path, side: str, values: list[str]) -> np.ndarray:
    keys = pa.array([content_key(v) for v in values])
    parts = list(_store(out, side).lookup(keys, keys, "id"))
    table = pa.concat_tables(parts).sort_by("id")
    return vectors_of(table.column("embedding"))


def test_compact_keeps_the_rows_of_the_last_runs(job, capsys):
    out, args = job
    before = _lookup(out, "texts", ["b", "c", "d"])
    assert main(["store", "compact", *args, "--keep-runs", "2"]) == 0
    printed = capsys.readouterr().out
    # nights 2 and 3 use b, c, d (and B, C, D): a and A, which only night 1 used, are dropped
    assert _stored(out, "texts") == _keys(["b", "c", "d"]) and _stored(out, "images") == _keys(["B", "C", "D"])
    assert np.array_equal(_lookup(out, "texts", ["b", "c", "d"]), before)  # the same bits
    assert "demo-tiny/0123456789abcdef-fp32/texts" in printed and "4 -> 3" in printed and "8 -> 6" in printed
    assert "2 runs (20260102T020000Z-000001 .. 20260103T020000Z-000002)" in printed
    assert len(list((out / "store-refs").rglob("*.parquet"))) == 4  # night 1's refs files are gone
    parts = {p: p.stat().st_mtime_ns for p in (out / "store").rglob("part-*.parquet")}
    assert main(["store", "compact", *args, "--keep-runs", "2"]) == 0  # nothing more to drop: no file rewritten
    assert {p: p.stat().st_mtime_ns for p in (out / "store").rglob("part-*.parquet")} == parts
    assert main(["store", "compact", *args, "--keep-runs", "1"]) == 0
    assert _stored(out, "texts") == _keys(["c", "d"]) and _stored(out, "images") == _keys(["C", "D"])


def test_keep_runs_counts_only_runs_that_committed_something(job, capsys):
    """A rerun with nothing to do and a call that failed before committing are no runs: --keep-runs 2 keeps the
    rows of the last two nights however many of them came after."""
    out, args = job
    refs = json.loads((out / "runs" / "20260103T020000Z-000002.json").read_text())["store_refs"]
    noops = [("20260103T030000Z-000003", "finished", {"prepare": {"status": "up to date"}}),
             ("20260103T040000Z-000004", "failed: StageOrderError: encode reads what translate commits", {}),
             ("20260103T050000Z-000005", "finished", {"prepare": {"status": "up to date"}})]
    for run_id, status, stages in noops:
        record = {"run_id": run_id, "status": status, "stages": stages, "store_refs": refs}
        (out / "runs" / f"{run_id}.json").write_text(json.dumps(record))
    assert main(["store", "compact", *args, "--keep-runs", "2"]) == 0
    assert "2 runs (20260102T020000Z-000001 .. 20260103T020000Z-000002)" in capsys.readouterr().out
    assert _stored(out, "texts") == _keys(["b", "c", "d"])  # night 2's b is kept


def test_compact_drops_a_key_stored_twice_and_unused_folders(job):
    out, args = job
    texts = _store(out, "texts")
    texts.append(pq.read_table(texts.parts()[0]))  # two runs at once stored the same rows twice
    old = EmbeddingStore(out / "store", "demo-tiny", "fedcba9876543210", "fp32", "texts")  # a retired checkpoint
    old.append(pq.read_table(texts.parts()[0]))
    assert main(["store", "compact", *args, "--keep-runs", "3"]) == 0
    assert _stored(out, "texts") == _keys(["a", "b", "c", "d"])
    assert not (out / "store" / "demo-tiny" / "fedcba9876543210-fp32").exists()


def test_lookup_lists_the_parts_once_while_another_job_appends(job, monkeypatch):
    out, _ = job
    texts, keys = _store(out, "texts"), pa.array([content_key(v) for v in ["b", "c", "d"]])
    expected = _lookup(out, "texts", ["b", "c", "d"])
    stranger = pa.table({"hash": [content_key(v) for v in "xyz"], "embedding": [[9.0] * 8] * 3,
                         "error": [None] * 3}, schema=pq.read_schema(texts.parts()[0]))
    real, calls = EmbeddingStore.parts, []

    def appending(self):  # another job commits a part (sorted first) right after the first listing
        listed = real(self)
        calls.append(listed)
        if len(calls) == 1:
            pq.write_table(stranger, self.dir / "part-0.parquet")
        return listed

    monkeypatch.setattr(EmbeddingStore, "parts", appending)
    table = pa.concat_tables(texts.lookup(keys, keys, "id")).sort_by("id")
    assert np.array_equal(vectors_of(table.column("embedding")), expected)  # no row of the new part attached


@pytest.mark.parametrize("step, call", [("_write_staged", 2), ("_bring_in", 2), ("_retire", 1), ("_retire", 3)])
def test_a_crash_inside_compaction_loses_nothing(job, monkeypatch, step, call):
    out, args = job
    needed = {"texts": ["b", "c", "d"], "images": ["B", "C", "D"]}
    vectors = {side: _lookup(out, side, values) for side, values in needed.items()}
    monkeypatch.setattr(store_maintenance, "PART_ROWS", 1)  # one row a part: several new parts to swap in
    real, calls = getattr(store_maintenance, step), []

    def crashing(*a):
        calls.append(a)
        if len(calls) == call:
            raise RuntimeError("killed mid-compaction")
        return real(*a)

    monkeypatch.setattr(store_maintenance, step, crashing)
    with pytest.raises(RuntimeError, match="killed mid-compaction"):
        main(["store", "compact", *args, "--keep-runs", "2"])
    for side, values in needed.items():  # every needed row is still there, with its bits
        assert np.array_equal(_lookup(out, side, values), vectors[side])
    monkeypatch.setattr(store_maintenance, step, real)
    assert main(["store", "compact", *args, "--keep-runs", "2"]) == 0  # the rerun finishes the job
    for side, values in needed.items():
        assert _stored(out, side) == _keys(values) and np.array_equal(_lookup(out, side, values), vectors[side])
    assert not list((out / "store").rglob(f"{store_maintenance.STAGED}*"))


def test_stats_lists_folders_precisions_and_the_runs_that_reference_them(job, capsys):
    out, args = job
    record = {"run_id": "20260104T020000Z-000003", "status": "interrupted"}  # died before recording its refs
    (out / "runs" / f"{record['run_id']}.json").write_text(json.dumps(record))
    assert main(["store", "stats", *args]) == 0
    printed = capsys.readouterr().out
    assert "2 folder(s), 8 rows" in printed
    texts = next(line for line in printed.splitlines() if " texts " in line)
    assert texts.split()[:5] == ["demo-tiny", CHECKPOINT, "fp32", "texts", "4"]
    assert texts.endswith("3: 20260101T020000Z-000000 .. 20260103T020000Z-000002")
    runs = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.startswith("  2026")}
    assert runs["20260101T020000Z-000000"] == ["finished", "6", "rows"]
    assert runs["20260104T020000Z-000003"][:3] == ["interrupted", "none", "recorded"]


def test_errors_say_what_to_do(job, tmp_path, capsys):
    out, args = job
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"input: {{articles: a, images: i}}\noutput_dir: {tmp_path / 'nothing'}\n")
    assert main(["store", "compact", str(empty)]) == 2
    assert "does not exist: check the job file or --set output_dir" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert main(["store", "compact", str(empty)]) == 2
    assert "no run of this job is recorded" in capsys.readouterr().err
    assert main(["store", "compact", *args, "--set", f"store_dir={tmp_path / 'shared'}"]) == 2
    assert "--only-this-job" in capsys.readouterr().err
    from newsclip.runtime.runner import _exclusive

    with _exclusive(out):  # a run of the job is going
        assert main(["store", "compact", *args]) == 2
    assert "another newsclip run is using this output_dir" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["stages"]["encode:demo-tiny:images"]["refs"]  # encoded before runs recorded their rows
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["store", "compact", *args]) == 2
    assert "run `newsclip encode JOB.yaml` once" in capsys.readouterr().err
    assert _stored(out, "texts") == _keys(["a", "b", "c", "d"])  # nothing was touched


NIGHTLY = Path(__file__).resolve().parents[1] / "jobs" / "nightly.yaml"
STAGES = ("prepare", "translate", "encode", "knn")  # what the store and the rankings depend on


def _config(root: Path, output: str, store: Path | None = None):
    from newsclip import config

    settings = {"input.articles": root / "data" / "articles", "input.images": root / "data" / "images",
                "output_dir": root / output, "translate.enabled": "false", "store_dir": store or "null"}
    return config.load(NIGHTLY, [f"{key}={value}" for key, value in settings.items()])


def _delete(articles: Path, original: pa.Table, deleted: list[str]) -> None:
    keep = pc.invert(pc.is_in(original.column("article_id"), value_set=pa.array(deleted)))
    pq.write_table(original.filter(keep), articles / "part-00000.parquet")


@pytest.mark.slow  # a whole job (its first run encodes 150 articles and their images)
def test_nights_that_delete_articles_compact_then_a_nightly_run_equals_a_full_run(tmp_path, demo_tiny, ray_local,
                                                                                   monkeypatch, capsys):
    from newsclip.demo.data import write_demo_data
    from newsclip.runtime.runner import run_stages

    root = tmp_path
    write_demo_data(root / "data", 150, seed=3)
    cfg = _config(root, "out")
    run_stages(cfg, STAGES)
    queries = pq.read_table(cfg.output / "prepared" / "queries", columns=["article_id", "query_text"])
    ids, texts = queries.column("article_id").to_pylist(), queries.column("query_text").to_pylist()
    gone, back = ids[:3], ids[3:6]  # deleted on night 2 for good; deleted on night 3, restored on night 4
    text_key = {i: content_key(t) for i, t in zip(ids, texts)}
    original = pq.read_table(root / "data" / "articles" / "part-00000.parquet")
    _delete(root / "data" / "articles", original, gone)
    run_stages(cfg, STAGES)
    _delete(root / "data" / "articles", original, gone + back)
    run_stages(cfg, STAGES)
    shutil.copytree(cfg.store, root / "store-before")
    job = [str(NIGHTLY), "--set", f"output_dir={cfg.output}"]

    def killed(part: Path) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(store_maintenance, "_retire", killed)
    with pytest.raises(RuntimeError):  # a first compaction dies mid-swap; the second finishes
        main(["store", "compact", *job, "--keep-runs", "2"])
    monkeypatch.undo()
    assert main(["store", "compact", *job, "--keep-runs", "2"]) == 0
    texts_store = next(cfg.store.glob("demo-tiny/*/texts"))
    stored = set(pq.read_table(texts_store, columns=["hash"]).column("hash").to_pylist())
    assert not {text_key[i] for i in gone} & stored and {text_key[i] for i in back} <= stored
    refs = {f for run in store_maintenance.run_records(cfg.output)[-2:] for f in run["store_refs"]}
    assert len(stored) == len(pc.unique(pa.concat_arrays(
        [pq.read_table(cfg.output / f).column("hash").combine_chunks() for f in refs if "/texts/" in f])))
    assert main(["store", "stats", *job]) == 0
    assert "demo-tiny" in capsys.readouterr().out

    _delete(root / "data" / "articles", original, gone)  # night 4: the articles deleted on night 3 are back
    night = run_stages(cfg, STAGES)
    assert night["stages"]["encode"]["encoded"] == 0 and night["stages"]["encode"]["reused"] > 0
    full = run_stages(_config(root, "full", root / "store-before"), STAGES)  # from scratch, uncompacted store
    assert full["stages"]["knn"]["status"] == "done"
    for name in ("demo-tiny.parquet", "demo-tiny.image_to_text.parquet"):
        nightly_ranks, full_ranks = (pq.read_table(root / out / "rankings" / name) for out in ("out", "full"))
        key = nightly_ranks.column_names[0]
        assert nightly_ranks.sort_by(key).equals(full_ranks.sort_by(key))  # ids and scores, bit for bit
    assert (root / "out" / "rankings" / "demo-tiny.tsv").read_bytes() == \
        (root / "full" / "rankings" / "demo-tiny.tsv").read_bytes()
