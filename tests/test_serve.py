"""`newsclip search` and `newsclip serve` over the demo job's index: the API's contract in process, its 4xx answers,
a query equal to an article's text finding that article's true image first, the swap to a new run while a client
searches, and the page in a real headless Chromium."""

import base64
import json
import shutil
import threading
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from newsclip import config
from newsclip.cli import main
from newsclip.demo.data import append_demo_data, write_demo_data
from newsclip.runtime.runner import run_stages
from newsclip.serve.app import MAX_BODY_BYTES, create_app, needs_token
from newsclip.serve.follow import IndexFollower
from newsclip.serve.index import IndexNotReady, load_snapshot

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo.yaml"
ARTICLES = 200


@pytest.mark.parametrize("n, k, threads", [(5, 20, 1), (3000, 1, 1), (3000, 20, 2), (3000, 1000, 2)])
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_nearest_equals_a_float64_argsort_with_ties_by_row(n, k, threads, int8, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from newsclip.retrieval.exact_scores import exact_scores
    from newsclip.serve import int8_rows
    from newsclip.serve import nearest as module
    from newsclip.serve.nearest import nearest, row_norm_bound

    monkeypatch.setattr(module, "BLOCK_PRODUCTS", 1000)  # the pass in many steps, as at 1M rows
    monkeypatch.setattr(int8_rows, "ROWS_PER_STEP", 1000)
    monkeypatch.setattr(int8_rows, "_CHUNK_VALUES", 16 * 512)  # the copy made 512 rows at a time, the last in part
    monkeypatch.setattr(int8_rows.Int8Rows, "MAX_QUERIES", 64)  # all 13 queries in one int8 pass
    rng = np.random.default_rng(n + k)
    rows = rng.standard_normal((n, 16)).astype(np.float32)
    rows[:, 3] *= 40  # dimensions of other scales (each has its own int8 scale), one all zeros
    rows[:, 5] = 0
    rows[n // 2 :: 7] = rows[1]  # exact ties, to be ordered by row
    q = np.concatenate([rows[1:2], rng.standard_normal((12, 16)).astype(np.float32)])
    with ThreadPoolExecutor(threads) as steps:  # the pass's steps shared out, as the server runs them
        got_rows, got_scores = nearest(rows, row_norm_bound(rows), q, k, steps.map,
                                       int8_rows.Int8Rows.of(rows) if int8 else None)
    exact = exact_scores(rows, q, np.broadcast_to(np.arange(n), (len(q), n)))
    want = np.lexsort((np.broadcast_to(np.arange(n), exact.shape), -exact.astype(np.float64)), axis=1)[:, :k]
    assert np.array_equal(got_rows, want)
    assert np.array_equal(got_scores, np.take_along_axis(exact, want, axis=1))


def test_the_int8_pass_keeps_every_row_that_can_reach_the_floor_and_only_rows_near_it(monkeypatch):
    """Every row whose exact score reaches a query's floor is a candidate (the bound holds, whatever the floor), and
    only rows within twice the bound below it are: the bound is each dimension's rounding to 255 levels. The rows
    that test the bound most: one per query whose every dimension rounds by almost half a level against it."""
    from newsclip.retrieval.exact_scores import exact_scores
    from newsclip.serve import int8_rows

    monkeypatch.setattr(int8_rows, "ROWS_PER_STEP", 5000)
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((20_000, 64)).astype(np.float32) * np.geomspace(1, 0.05, 64, dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)  # CLIP-like: unit rows, a few directions carry the spread
    q = rng.standard_normal((3, 64)).astype(np.float32)
    level = np.abs(rows).max(axis=0).astype(np.float64) / 127
    against = level * (rng.integers(0, 100, (3, 64)) + 0.499) * np.sign(q)  # each |x| rounds down: all under-count
    rows = np.concatenate([rows, against.astype(np.float32)])
    int8 = int8_rows.Int8Rows.of(rows)
    exact = exact_scores(rows, q, np.broadcast_to(np.arange(len(rows)), (3, len(rows)))).astype(np.float64)
    bound = int8.bound(q)
    assert np.all(bound <= 1.01 * np.abs(q) @ level / 2), bound
    own = exact[np.arange(3), len(rows) - 3 + np.arange(3)]  # each query's score with its row against it
    for floors in [np.quantile(exact, p, axis=1) for p in (0.5, 0.99, 0.9995)] + [own]:
        floors = floors.astype(np.float32)
        rows_of, queries = np.divmod(int8.hits(q, floors), 3)
        for c in range(3):
            got = set(rows_of[queries == c])
            assert set(np.flatnonzero(exact[c] >= floors[c])) <= got
            assert exact[c, sorted(got)].min() >= floors[c] - 2.001 * bound[c]


def test_a_checkpoint_is_found_by_the_name_reports_give_it():
    """`--backbone demo/model.pt` (and `"backbone": "demo/model.pt"`) as the report and metrics name the fine-tuned
    `out/finetune/demo/model.pt`; nothing else but the job's own names."""
    from newsclip.serve.index import Articles, BackboneIndex, Side, Snapshot

    side = Side.from_arrays(np.array(["i0"], object), np.ones((1, 4), np.float32))
    names = ["ViT-B/32", "out/finetune/demo/model.pt", "ckpt/rn50-news.pt"]
    snap = Snapshot("run", {n: BackboneIndex(n, side, None, None) for n in names}, Articles.empty(), None)
    for name in names:
        assert snap.backbone_named(name) == name
    assert snap.backbone_named("demo/model.pt") == "out/finetune/demo/model.pt"
    assert snap.backbone_named("rn50-news.pt") == "ckpt/rn50-news.pt"
    for other in ("32", "model.pt", "demo", "../model.pt", ""):
        assert snap.backbone_named(other) is None


@pytest.mark.parametrize("k", [1, 20, 1000])
def test_a_side_on_a_gpu_answers_as_the_cpu_pass(k, monkeypatch):
    """A GPU process searches a side with the knn stage's torch engine (fp16 products, exact re-scores): the same ids
    and scores, ties by id, as the CPU's pass. Here the engine's GPU recipe runs on the CPU."""
    import torch

    from newsclip.retrieval import search, torch_search
    from newsclip.serve.index import Side

    rng = np.random.default_rng(k)
    rows = rng.standard_normal((3000, 16)).astype(np.float32)
    rows[1500::7] = rows[1]  # exact ties, ordered by id
    side = Side.from_arrays(np.array([f"img-{i:05d}" for i in rng.permutation(3000)], object), rows)
    assert side.on_gpu().device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch_search, "GPU_RECIPE_ON_CPU", True)
    recipe = search._Shard(side.vectors, 0, search.KnnConfig(engine="torch"))
    assert recipe.rows.info["products"] == "fp16"
    q = np.concatenate([rows[1:2], rng.standard_normal((5, 16)).astype(np.float32)])
    assert replace(side, gpu=recipe).nearest(q, k) == side.nearest(q, k)


def test_a_side_for_serving_reads_an_int8_copy_and_answers_as_the_float32_pass(monkeypatch):
    """A server's side keeps an int8 copy of its rows for the CPU's pass (from MIN_VALUES on), and its answers are
    the float32 pass's, for every batch size that reads it."""
    import torch

    from newsclip.serve import int8_rows
    from newsclip.serve.index import Side

    rng = np.random.default_rng(8)
    side = Side.from_arrays(np.array([f"img-{i:05d}" for i in range(3000)], object),
                            rng.standard_normal((3000, 32)).astype(np.float32))
    assert side.for_serving().int8 is None  # few rows: the float32 product is as fast
    monkeypatch.setattr(int8_rows, "MIN_VALUES", 3000 * 32)
    if torch.cuda.is_available():
        assert side.for_serving().device == "cuda:0"
        return
    served = side.for_serving()
    assert served.int8 is not None and served.search == "cpu int8"
    assert served.nbytes == side.vectors.nbytes + served.int8.blocks.nbytes
    for b in range(1, int8_rows.Int8Rows.MAX_QUERIES + 2):  # the last one: the float32 pass's
        q = rng.standard_normal((b, 32)).astype(np.float32)
        for k in (1, 20, 1000):
            assert served.nearest(q, k) == side.nearest(q, k)


def _settings(root: Path) -> list[str]:
    # translate off: the demo's English and German texts are searched as they are (no translator build needed)
    return [f"input.articles={root / 'data' / 'articles'}", f"input.images={root / 'data' / 'images'}",
            f"output_dir={root / 'out'}", "translate.enabled=false"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_tiny):
    """The demo job run once in this process (under ray.inline_rows: no Ray), and the app over its index."""
    from starlette.testclient import TestClient

    root = tmp_path_factory.mktemp("serve")
    write_demo_data(root / "data", ARTICLES, seed=5)
    cfg = config.load(DEMO, _settings(root))
    first = run_stages(cfg)
    follower = IndexFollower(cfg, poll_s=0)  # the tests swap by calling refresh(), not by waiting for a poll
    with TestClient(create_app(follower)) as client:
        yield root, cfg, first["run_id"], follower, client


def test_without_translation_the_run_names_the_original_texts(served):
    root = served[0]
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    for side in ("texts", "images"):
        entry = manifest["stages"][f"encode:demo-tiny:{side}"]
        assert entry["text"] == "original" and entry["model"].endswith("text original")
    report = (root / "out" / "report.md").read_text() + (root / "out" / "report.html").read_text()
    assert "text original" in report and "text translated" not in report


def _queries(root: Path) -> dict:
    table = pq.read_table(root / "out" / "prepared" / "queries",
                          columns=["article_id", "query_text", "title", "image_id"])
    return {r["article_id"]: r for r in table.to_pylist()}


def _rankings(root: Path) -> dict:
    table = pq.read_table(root / "out" / "rankings" / "demo-tiny.parquet")
    return {r["article_id"]: r for r in table.to_pylist()}


def test_healthz_names_the_run_and_its_sizes(served):
    _, _, run_id, _, client = served
    health = client.get("/healthz").json()
    assert health["index"] == run_id
    assert health["backbones"]["demo-tiny"]["dim"] == 64
    assert health["backbones"]["demo-tiny"]["images"] > 0 and health["articles"] > 0


def test_article_text_finds_its_true_image_first_with_its_stored_embedding(served):
    root, cfg, run_id, follower, client = served
    queries, rankings = _queries(root), _rankings(root)
    hits = [a for a, r in rankings.items() if r["image_ids"][0] == queries[a]["image_id"]]
    assert hits, "demo-tiny ranks no article's own image first"
    article = hits[0]
    answer = client.post("/search", json={"text": queries[article]["query_text"], "k": 10,
                                          "backbone": "demo-tiny"}).json()
    assert answer["index"] == run_id and answer["backbone"] == "demo-tiny"
    assert answer["results"][0]["image_id"] == queries[article]["image_id"]
    assert article in answer["results"][0]["article_ids"]
    # the same ten images and scores as the knn stage's rankings: the query is the stored embedding, the search exact
    assert [r["image_id"] for r in answer["results"]] == rankings[article]["image_ids"][:10]
    assert [r["score"] for r in answer["results"]] == pytest.approx(rankings[article]["scores"][:10], abs=0)


def test_new_text_is_encoded_as_the_encode_stage_encodes_it(served):
    """A text not in the index goes through the encoder: the same vector in a batch of several, and the same
    vector as the encode stage's class gives it."""
    root, cfg, _, follower, _ = served
    from newsclip.serve.query import QueryEncoders

    encoders = QueryEncoders(cfg)
    index = follower.current.backbones["demo-tiny"]
    one = encoders.texts(index, ["a blue circle on a beach, in the morning"])
    many = encoders.texts(index, ["a green square", "a blue circle on a beach, in the morning", "snow in Oslo"])
    assert np.array_equal(one[0], many[1])
    assert abs(float(np.linalg.norm(one[0])) - 1) < 1e-5


def test_queries_searched_together_get_the_answers_they_get_alone(served):
    from newsclip.serve.batcher import Batcher, Query
    from newsclip.serve.query import QueryEncoders

    root, cfg, _, follower, _ = served
    snap = follower.current
    texts = [r["query_text"] for r in list(_queries(root).values())[:12]] + [f"a red circle in Oslo {i}" for i in
                                                                             range(12)]
    batcher = Batcher(QueryEncoders(cfg))
    try:
        alone = [batcher.search(Query(snap, "demo-tiny", 5 + i % 3, text=t)) for i, t in enumerate(texts)]
        futures = [batcher.submit(Query(snap, "demo-tiny", 5 + i % 3, text=t)) for i, t in enumerate(texts)]
        assert [f.result() for f in futures] == alone
        assert batcher.batches < 2 * len(texts)  # the second round went in fewer, larger batches
    finally:
        batcher.close()


def test_step_threads_answer_as_one_and_a_failing_batch_fails_only_its_queries(served):
    from dataclasses import replace

    from newsclip.serve.batcher import Batcher, Query
    from newsclip.serve.query import QueryEncoders

    root, cfg, _, follower, _ = served
    snap = follower.current
    index = snap.backbones["demo-tiny"]

    class Broken:  # a side whose search fails (the encoder only reads its width)
        vectors = index.images.vectors[:1]

        def nearest(self, q, k, map_steps):
            raise RuntimeError("this side cannot be searched")

    broken = replace(snap, backbones={"demo-tiny": replace(index, images=Broken())})
    texts = [r["query_text"] for r in list(_queries(root).values())[:8]] + [f"a red circle in Oslo {i}" for i in
                                                                            range(8)]
    encoders, answers = QueryEncoders(cfg), []
    for threads in (1, 2):
        batcher = Batcher(encoders, step_threads=threads)
        try:
            futures = [batcher.submit(Query(broken if i % 5 == 0 else snap, "demo-tiny", 5, text=t))
                       for i, t in enumerate(texts)]
            for i, future in enumerate(futures):
                if i % 5 == 0:
                    with pytest.raises(RuntimeError, match="cannot be searched"):
                        future.result()
            answers.append([f.result() for i, f in enumerate(futures) if i % 5])
            assert batcher.search(Query(snap, "demo-tiny", 5, text=texts[0]))  # the threads went on
        finally:
            batcher.close()
    assert answers[0] == answers[1] and all(len(a) == 5 for a in answers[1])


def test_article_endpoint_gives_its_ranked_images_best_first(served):
    root, _, run_id, _, client = served
    article, ranking = next(iter(_rankings(root).items()))
    body = client.get(f"/articles/{article}").json()
    assert body["article_id"] == article and body["index"] == run_id and body["title"]
    assert [i["image_id"] for i in body["images"]] == ranking["image_ids"]
    scores = [i["score"] for i in body["images"]]
    assert scores == sorted(scores, reverse=True)


def test_image_endpoint_returns_a_thumbnail_and_an_image_query_finds_itself(served):
    root, _, _, _, client = served
    article, ranking = next(iter(_rankings(root).items()))
    image_id = ranking["image_ids"][0]
    thumb = client.get(f"/images/{image_id}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:2] == b"\xff\xd8"
    shards = pq.read_table(root / "data" / "images")
    data = shards.column("image")[shards.column("image_id").to_pylist().index(image_id)].as_py()
    answer = client.post("/search", json={"image": base64.b64encode(data).decode(), "k": 3}).json()
    assert answer["results"][0]["image_id"] == image_id
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    articles = client.post("/search", json={"image": base64.b64encode(data).decode(), "k": 3,
                                            "target": "articles"}).json()
    assert len(articles["results"]) == 3 and all("article_id" in r for r in articles["results"])


@pytest.mark.parametrize("request_, status", [
    (("post", "/search", {"content": b"{not json"}), 400),
    (("post", "/search", {"json": ["text"]}), 400),
    (("post", "/search", {"json": {"k": 5}}), 422),  # neither text nor image
    (("post", "/search", {"json": {"text": "a", "image": "AAAA"}}), 422),
    (("post", "/search", {"json": {"text": "a", "k": 1001}}), 422),  # k is capped at 1,000
    (("post", "/search", {"json": {"text": "a", "k": 0}}), 422),
    (("post", "/search", {"json": {"text": "a", "k": "5"}}), 422),
    (("post", "/search", {"json": {"text": "a", "backbone": "RN50"}}), 404),
    (("post", "/search", {"json": {"text": "a", "backbone": "../../etc/passwd"}}), 404),
    (("post", "/search", {"json": {"text": "x" * 10_001}}), 413),
    (("post", "/search", {"json": {"image": "not base64!"}}), 422),
    (("post", "/search", {"json": {"image": base64.b64encode(b"not an image").decode()}}), 422),
    (("post", "/search", {"content": b"x" * (MAX_BODY_BYTES + 1)}), 413),
    (("post", "/search", {"json": {"text": "a", "where": "/etc"}}), 422),
    (("get", "/articles/no-such-article", {}), 404),
    (("get", "/articles/art-000001?backbone=RN50", {}), 404),
    (("get", "/images/no-such-image", {}), 404),
    (("get", "/images/..%2F..%2F..%2Fetc%2Fpasswd", {}), 404),
    (("get", "/images/" + "a" * 600, {}), 404),
    (("get", "/search", {}), 405),
    (("get", "/nothing-here", {}), 404),
])
def test_hostile_requests_get_a_clear_4xx_and_change_nothing(served, request_, status):
    _, _, run_id, follower, client = served
    method, path, kwargs = request_
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert follower.current.run_id == run_id


def test_an_oversized_image_is_refused_by_encodes_pixel_bound(served):
    """An image whose header claims more pixels than encode.max_image_pixels is refused before it is decoded."""
    import io

    from PIL import Image

    _, cfg, _, follower, client = served
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    data = bytearray(bomb.getvalue())
    data[16:24] = (8000).to_bytes(4, "big") * 2  # IHDR width and height: 64M pixels (over 40M), in a few bytes
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the chunk's checksum, for the new size
    answer = client.post("/search", json={"image": base64.b64encode(bytes(data)).decode()})
    assert answer.status_code == 422 and "exceeds the bound" in answer.json()["error"]


def test_serve_on_a_port_in_use_says_so_before_loading_the_index(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(DEMO), "--port", str(port), "--set", f"output_dir={tmp_path / 'none'}"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_token_is_required_off_loopback_and_checked(served):
    from starlette.testclient import TestClient

    _, _, _, follower, _ = served
    assert needs_token("0.0.0.0") and needs_token("10.1.2.3") and not needs_token("127.0.0.1")
    with TestClient(create_app(follower, token="s3cret")) as client:
        assert client.get("/healthz").status_code == 401
        assert client.post("/search", json={"text": "a"}).status_code == 401
        assert client.get("/healthz", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/healthz", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/?token=s3cret").status_code == 200
    assert main(["serve", str(DEMO), "--host", "0.0.0.0"]) == 2  # refused before anything starts


def test_search_command_prints_ranked_images_and_their_articles(served, capsys):
    root, _, run_id, _, _ = served
    queries = _queries(root)
    article = next(iter(queries))
    # the job's settings between the job and the query, as a user adds them to a command
    settings = [a for s in _settings(root) for a in ("--set", s)]
    assert main(["search", str(DEMO), *settings, queries[article]["query_text"], "--k", "5", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["index"] == run_id and len(answer["results"]) == 5
    assert [r["image_id"] for r in answer["results"]] == _rankings(root)[article]["image_ids"][:5]


def test_a_job_that_encodes_on_gpus_is_searched_from_a_machine_without_one(served, capsys):
    """encode.num_gpus_per_actor: 1 (the job's nights ran on GPUs) and no GPU here: queries are encoded on the CPU in
    fp32, as the same job on CPUs encodes them (before, every search failed: the encoder refused a missing GPU)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: its fp16 queries would be encoded there")
    settings = [a for s in _settings(served[0]) for a in ("--set", s)]
    args = ["search", str(DEMO), *settings, "a red square by the river, at night", "--k", "5", "--json"]
    assert main(args) == 0
    on_cpus = json.loads(capsys.readouterr().out)
    assert main([*args, "--set", "encode.num_gpus_per_actor=1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == on_cpus and "encoded on the CPU in fp32" in err


def test_no_query_is_encoded_by_other_weights_than_the_index_was(served, tmp_path, monkeypatch, capsys):
    """Another demo-tiny here than the run encoded with (another $NEWSCLIP_CACHE, a model trained again): search
    refuses with exit status 2, naming both weights, and a server does not serve that run (here its first: none)."""
    from newsclip.retrieval.backbones import cache_dir

    root = served[0]
    other = tmp_path / "cache"
    other.mkdir()
    (other / "demo-tiny.pt").write_bytes((cache_dir() / "demo-tiny.pt").read_bytes() + b"\0")  # another checksum
    monkeypatch.setenv("NEWSCLIP_CACHE", str(other))
    assert main(["search", str(DEMO), "snow in Oslo", *(a for s in _settings(root) for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert "embeddings were made with weights" in err and str(other / "demo-tiny.pt") in err
    follower = IndexFollower(config.load(DEMO, _settings(root)), poll_s=0)
    assert not follower.refresh()
    assert follower.current is None and "embeddings were made with weights" in follower.waiting


def test_a_server_holds_the_int8_copy_and_a_single_search_does_not(served, monkeypatch):
    """The follower loads the run `for_serving` (on a CPU replica the int8 copy, from MIN_VALUES on; here from any
    size), and a single `newsclip search` reads the float32 rows; both answer alike."""
    from newsclip.serve import int8_rows
    from newsclip.serve.follow import IndexFollower
    from newsclip.serve.index import Side, load_snapshot

    _, cfg, _, _, _ = served
    monkeypatch.setattr(int8_rows, "MIN_VALUES", 0)
    monkeypatch.setattr(Side, "on_gpu", lambda side: side)  # a CPU replica, also where a GPU is
    follower = IndexFollower(cfg, poll_s=0)
    assert follower.refresh()
    served_side = follower.current.backbones["demo-tiny"].images
    single = load_snapshot(cfg).backbones["demo-tiny"].images
    assert served_side.search == "cpu int8" and single.search == "cpu" and single.int8 is None
    q = np.random.default_rng(0).standard_normal((3, single.vectors.shape[1])).astype(np.float32)
    assert served_side.nearest(q, 20) == single.nearest(q, 20)


def test_serve_latency_answers_every_query_and_reports_the_bar_s_numbers(tmp_path, demo_tiny):
    """benchmarks/serve_latency.py (issue 26's bar) at its smallest, 2,000 images for 2 s at 50 QPS: a server process,
    every query answered with no error, and the numbers the bar is read from (latency percentiles, QPS, batches, the
    server's memory)."""
    import subprocess
    import sys

    out = tmp_path / "latency.json"
    done = subprocess.run([sys.executable, "benchmarks/serve_latency.py", "--sizes", "2000", "--seconds", "2",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["images"] == 2000 and row["search"] == "cpu", row  # too few for the int8 copy
    assert row["sent"] > 20 and row["answered"] == row["sent"] and row["errors"] == 0, row
    assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] and row["qps_answered"] > 0, row
    assert row["batches"] > 0 and row["server_rss_mb"] > 0, row


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run does)")
def test_page_in_a_real_browser_searches_and_opens_an_article(served, tmp_path):
    """Type a query, see the images, open an article with the keyboard and go back; with two backbones, choose the
    other one and the same query is searched with it; a late answer is dropped; search with a photo."""
    import uvicorn

    from newsclip.retrieval.backbones import cache_dir
    from newsclip.serve.follow import StaticIndex

    sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test "
                                          "extra pins it)").sync_playwright

    root, cfg, _, follower, _ = served
    queries = _queries(root)
    photo_id = next(iter(_rankings(root).values()))["image_ids"][0]
    shards = pq.read_table(root / "data" / "images")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(shards.column("image")[shards.column("image_id").to_pylist().index(photo_id)].as_py())
    other = tmp_path / "demo-copy.pt"  # a second backbone: demo-tiny's weights as a checkpoint file, its index
    shutil.copyfile(cache_dir() / "demo-tiny.pt", other)
    snap = follower.current
    two = replace(snap, backbones={**snap.backbones, str(other): replace(snap.backbones["demo-tiny"], name=str(other))})
    server = uvicorn.Server(uvicorn.Config(create_app(StaticIndex(two), cfg=cfg), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            thread.join(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(bypass_csp=True)  # the page forbids eval: the waits below use it
            outside = []
            page.on("request", lambda r: outside.append(r.url) if "127.0.0.1" not in r.url else None)
            page.goto(f"http://127.0.0.1:{port}/")
            page.keyboard.type(next(iter(queries.values()))["title"])  # the search box has the focus
            page.keyboard.press("Enter")
            page.wait_for_selector("#grid li img")
            assert page.locator("#grid li").count() == 20
            page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete "
                                   "&& i.naturalWidth > 0)")
            page.locator("#grid .meta a").first.focus()
            page.keyboard.press("Enter")  # open the first result's article with the keyboard
            page.wait_for_selector("#article:not(.hidden)")
            assert "ranked images" in page.locator("#article-title").inner_text()
            assert page.locator("#grid li").count() > 0
            page.keyboard.press("Escape")
            page.wait_for_selector("#article.hidden", state="attached")
            page.wait_for_function("document.getElementById('message').textContent.includes('(demo-tiny)')")
            page.select_option("#backbone", str(other))  # shown with two backbones; the query runs again
            page.wait_for_function(f"document.getElementById('message').textContent.includes({str(other)!r})")
            assert page.locator("#grid li").count() == 20
            # an answer that comes after a newer search's is dropped: the first search's is held back
            held = []  # the storm search's request, by its body
            page.route("**/search", lambda route: held.append(route) if "storm" in (route.request.post_data or "")
                       else route.continue_())
            for text in ("storm over the harbour", "a quiet market square"):
                page.fill("#q", text)
                page.keyboard.press("Enter")
                for _ in range(600):  # the storm's request held before the second search starts (30 s at most)
                    if held:
                        break
                    page.wait_for_timeout(50)
            page.wait_for_function("document.getElementById('message').textContent.includes('quiet market')")
            with page.expect_response("**/search"):
                held[0].continue_()
            page.wait_for_timeout(300)  # the page has the old answer: it must leave the newer one shown
            assert "quiet market" in page.locator("#message").inner_text()
            page.unroute("**/search")
            # search by image: an indexed photo finds itself first; Back from an article returns to its results
            page.select_option("#backbone", "demo-tiny")
            page.set_input_files("#file", photo)
            page.wait_for_function("document.getElementById('message').textContent.includes('photo.jpg (demo-tiny)')")
            assert page.locator("#grid .score").first.inner_text().split() == ["1.000", photo_id]
            page.locator("#grid .meta a").first.click()
            page.wait_for_selector("#article:not(.hidden)")
            page.keyboard.press("Escape")
            page.wait_for_function("document.getElementById('message').textContent.includes('photo.jpg')")
            assert page.locator("#grid .score").first.inner_text().split() == ["1.000", photo_id]
            browser.close()
        assert outside == []  # self-contained: nothing fetched from anywhere else
    finally:
        server.should_exit = True
        thread.join()


def test_cluster_serve_runs_the_app_as_ray_serve_replicas(served, ray_local, monkeypatch):
    """cluster/serve.py as `serve run cluster.serve:app` starts it (from the repository's root): replicas of the same
    app on the session's Ray behind Serve's proxy, each loading the job's index itself; the token is required and
    the answers are the app's in process."""
    import socket

    import httpx
    from ray import serve
    from ray._common.utils import import_attr

    root, _, run_id, _, client = served
    monkeypatch.syspath_prepend(str(REPO))  # `serve run`'s --app-dir, "." by default
    monkeypatch.delenv("NEWSCLIP_TOKEN", raising=False)
    app = import_attr("cluster.serve:app")  # the import path the README gives `serve run`
    with pytest.raises(ValueError, match="token"):
        app({"job": str(DEMO)})  # Serve's proxy is reachable from the cluster's network
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # the arguments as `serve run` hands them over: strings
        serve.run(app({"job": str(DEMO), "set": ";".join(_settings(root)), "replicas": "2", "num_cpus": "0.1",
                       "num_gpus": "0", "token": "s3cret"}), name="newsclip", route_prefix="/")
        deployment = serve.status().applications["newsclip"].deployments["NewsclipSearch"]
        assert deployment.replica_states.get("RUNNING") == 2
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 401
        health = httpx.get(f"{url}/healthz", headers=auth, timeout=30).json()
        assert health["index"] == run_id
        query = {"text": next(iter(_queries(root).values()))["query_text"], "k": 5, "backbone": "demo-tiny"}
        for _ in range(4):  # spread over both replicas: each answers as the app in process does
            got = httpx.post(f"{url}/search", json=query, headers=auth, timeout=30).json()
            assert got["results"] == client.post("/search", json=query).json()["results"]
    finally:
        serve.shutdown()


def test_nightly_run_swaps_the_index_while_a_client_searches(served, monkeypatch):
    """Runs last: a nightly run commits while a client loops on /search; no request fails, answers come from the
    new run afterwards, and a run that is interrupted leaves the new index serving."""
    root, cfg, first, follower, client = served
    text = next(iter(_queries(root).values()))["query_text"]
    seen, failures, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            response = client.post("/search", json={"text": text, "k": 5})
            if response.status_code != 200:
                failures.append(response.text)
            else:
                seen.append(response.json()["index"])

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        append_demo_data(root / "data", 10, seed=6)
        second = run_stages(cfg)["run_id"]
        assert follower.refresh()
        after = len(seen)
        while len(seen) < after + 3 and worker.is_alive():
            worker.join(0.01)
    finally:
        stop.set()
        worker.join()
    assert not failures
    assert seen[0] == first and seen[-1] == second and set(seen) == {first, second}
    assert seen[seen.index(second):] == [second] * (len(seen) - seen.index(second))  # never back to the old
    assert client.get("/healthz").json()["index"] == second

    # an interrupted run (knn stopped) leaves the index it had: stages it committed are not half-served
    from newsclip.retrieval import search

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.Index, "__init__", interrupted)
    append_demo_data(root / "data", 5, seed=7)
    with pytest.raises(KeyboardInterrupt):
        run_stages(cfg)
    assert not follower.refresh()
    with pytest.raises(IndexNotReady):
        load_snapshot(cfg)
    assert client.post("/search", json={"text": text, "k": 5}).json()["index"] == second
