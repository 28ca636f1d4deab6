"""The knn search against numpy argsort and a single faiss.IndexFlatIP, for shard counts, backends, engines (FAISS;
torch on the CPU, in float32 and with the GPU's fp16 recipe) and index kinds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from newsclip.retrieval.search import KnnConfig, merge_topk, search

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def knn_numpy(db_ids: np.ndarray, db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 inner products rounded to float32, sorted by score desc then id asc (numpy only)."""
    s = (queries.astype(np.float64) @ db.astype(np.float64).T).astype(np.float32)
    keys = np.broadcast_to(np.asarray(db_ids).astype(str), s.shape)
    order = np.lexsort((keys, -s), axis=1)[:, :k]
    return np.asarray(db_ids, dtype=object)[order], np.take_along_axis(s, order, axis=1)


def _batches(ids: np.ndarray, vec: np.ndarray, sizes: list[int]):
    s = 0
    for size in sizes:
        yield ids[s : s + size], vec[s : s + size]
        s += size
    if s < len(vec):
        yield ids[s:], vec[s:]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    db = _unit(rng.standard_normal((3000, D), dtype=np.float32))
    q = _unit(rng.standard_normal((250, D), dtype=np.float32))
    # ids not in row order, of varied length, so string order differs from row and numeric order
    db_ids = np.array([f"img-{i}" for i in rng.permutation(len(db))], dtype=object)
    q_ids = np.array([f"art-{i}" for i in range(len(q))], dtype=object)
    return db_ids, db, q_ids, q


def _cfg(backend: str, engine: str = "faiss", **kw) -> KnnConfig:
    # backend "ray" tests pull in conftest's session `ray_local` (a local 2-CPU Ray, reused if already running)
    if backend == "ray":
        # 2 CPUs in tests: seven 1-CPU actors would never all be placed
        kw.setdefault("num_cpus_per_actor", 0.25)
    return KnnConfig(backend=backend, engine=engine.removesuffix("-fp16"), **kw)


# the engines every exact search is held to: FAISS, torch on the CPU (float32 products), and torch's GPU recipe (fp16
# products of scaled rows, float64 re-scoring on the device with its fallback) run on the CPU
ENGINES = ("faiss", "torch", "torch-fp16")


@pytest.fixture
def engine(request, monkeypatch) -> str:
    """The engine parameter; "torch-fp16" switches torch's GPU recipe on in this process (local backend only)."""
    from newsclip.retrieval import torch_search

    monkeypatch.setattr(torch_search, "GPU_RECIPE_ON_CPU", request.param == "torch-fp16")
    return request.param


# On Ray once per engine, 3 shards (each shard actor is a process of its own that imports FAISS or torch: seconds on 2
# CPUs); the cases below run locally, where the shards, their merge and the ties are the same code.
@pytest.mark.parametrize(("backend", "engine", "shards"),
                         [("local", e, s) for e in ENGINES for s in (1, 2, 7)]
                         + [("ray", "faiss", 3), ("ray", "torch", 1)],
                         indirect=["engine"])
def test_exact_matches_numpy_and_faiss(data, backend, engine, shards, request):
    import faiss

    if backend == "ray":
        request.getfixturevalue("ray_local")
    db_ids, db, q_ids, q = data
    k = 20
    res = search(db_ids, db, _batches(q_ids, q, [17, 100, 3]),
                 _cfg(backend, engine, k=k, shards=shards, query_batch_size=64))
    ref_ids, ref_scores = knn_numpy(db_ids, db, q, k)
    assert res.ids.shape == (len(q), k) and res.scores.dtype == np.float32
    assert list(res.query_ids) == list(q_ids)
    assert (res.ids == ref_ids).all()
    np.testing.assert_array_equal(res.scores, ref_scores)
    flat = faiss.IndexFlatIP(D)
    flat.add(db)
    fd, fi = flat.search(q, k)
    assert (res.ids == db_ids[fi]).all()  # random data: no near-ties, so faiss's own order agrees
    np.testing.assert_allclose(res.scores, fd, atol=1e-5)
    assert res.recall_at_k is None
    assert len(res.shard_stats) == shards and sum(s["rows"] for s in res.shard_stats) == len(db)
    assert {s["engine"] for s in res.shard_stats} == {engine.removesuffix("-fp16")}


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_k_larger_than_a_shard(data, engine):
    db_ids, db, q_ids, q = data
    sub_ids, sub = db_ids[:300], db[:300]
    k = 120  # 3 shards of 100 rows: each shard holds fewer than k
    res = search(sub_ids, sub, [(q_ids, q)], _cfg("local", engine, k=k, shards=3))
    ref_ids, ref_scores = knn_numpy(sub_ids, sub, q, k)
    assert (res.ids == ref_ids).all()
    np.testing.assert_array_equal(res.scores, ref_scores)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_fewer_db_rows_than_k(data, engine):
    db_ids, db, q_ids, q = data
    res = search(db_ids[:5], db[:5], [(q_ids, q)], _cfg("local", engine, k=100, shards=3))
    assert res.ids.shape == (len(q), 5) and res.scores.shape == (len(q), 5)
    ref_ids, _ = knn_numpy(db_ids[:5], db[:5], q, 5)
    assert (res.ids == ref_ids).all()
    assert len(res.shard_stats) == 3


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_duplicate_vectors_tie_by_id_for_any_shard_count(engine):
    rng = np.random.default_rng(7)
    base = _unit(rng.standard_normal((40, D), dtype=np.float32))
    db = np.repeat(base, 5, axis=0)  # every vector 5 times: exact ties everywhere
    perm = rng.permutation(len(db))
    db = db[perm]
    db_ids = np.array([f"d{rng.integers(1_000_000):07d}-{i}" for i in range(len(db))], dtype=object)
    q = np.concatenate([base[:10], _unit(rng.standard_normal((10, D), dtype=np.float32))])
    q_ids = np.arange(len(q))
    k = 7  # cuts through the second tie group
    ref_ids, ref_scores = knn_numpy(db_ids, db, q, k)
    results = [search(db_ids, db, [(q_ids, q)], _cfg("local", engine, k=k, shards=s)).ids for s in (1, 2, 3, 7)]
    for r in results:
        assert (r == ref_ids).all()
    # the 5 copies of the query's own vector come first, in id order
    own = search(db_ids, db, [(q_ids[:1], q[:1])], _cfg("local", engine, k=5, shards=4))
    assert list(own.ids[0]) == sorted(own.ids[0])
    assert np.unique(own.scores[0]).size == 1


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_all_identical_vectors(engine):
    v = _unit(np.ones((1, D), np.float32))
    db = np.repeat(v, 60, axis=0)
    ids = np.array([f"x{i:03d}" for i in range(60)][::-1], dtype=object)
    for shards in (1, 4, 9):
        res = search(ids, db, [(np.arange(2), np.repeat(v, 2, axis=0))], _cfg("local", engine, k=10, shards=shards))
        assert list(res.ids[0]) == [f"x{i:03d}" for i in range(10)]


def test_query_stream_rebatching_and_float64_input(data):
    db_ids, db, q_ids, q = data
    one = search(db_ids, db, [(q_ids, q)], KnnConfig(k=10, shards=3))
    many = search(db_ids, db.astype(np.float64), _batches(q_ids, q.astype(np.float64), [1, 0, 50, 7, 90]),
                  KnnConfig(k=10, shards=3, query_batch_size=16))
    assert (one.ids == many.ids).all() and (one.scores == many.scores).all()
    assert list(many.query_ids) == list(q_ids)


def test_streamed_database_chunks(data):
    db_ids, db, q_ids, q = data
    chunks = (( db_ids[s : s + 700], db[s : s + 700]) for s in range(0, len(db), 700))
    res = search(None, chunks, [(q_ids, q)], KnnConfig(k=15, max_shard_rows=1000))
    ref_ids, ref_scores = knn_numpy(db_ids, db, q, 15)
    assert (res.ids == ref_ids).all()
    assert [s["rows"] for s in res.shard_stats] == [1000, 1000, 1000]
    chunks = ((db_ids[s : s + 700], db[s : s + 700]) for s in range(0, len(db), 700))
    res2 = search(None, chunks, [(q_ids, q)], KnnConfig(k=15, shards=4))
    assert (res2.ids == ref_ids).all() and len(res2.shard_stats) == 4


def test_empty_query_stream(data):
    db_ids, db, _, _ = data
    res = search(db_ids, db, iter(()), KnnConfig(k=5))
    assert res.ids.shape == (0, 5) and res.scores.shape == (0, 5) and len(res.query_ids) == 0


def _clustered(rng, n_db, n_q, d=D, centers=64, noise=0.15):
    c = _unit(rng.standard_normal((centers, d), dtype=np.float32))
    db = _unit(c[rng.integers(centers, size=n_db)] + noise * rng.standard_normal((n_db, d), dtype=np.float32))
    q = _unit(c[rng.integers(centers, size=n_q)] + noise * rng.standard_normal((n_q, d), dtype=np.float32))
    return db, q


# knobs set low so recall is below 1 and its measurement means something; measured recall@10 on this data:
# ivf (nlist 64 -> clamped to 2000 // 39 = 51 per shard, nprobe 2) 0.98, hnsw (M 4, ef 10 -> 18) 0.98
@pytest.mark.parametrize(("index", "floor", "extra"), [("ivf", 0.9, {"nlist": 64, "nprobe": 2}),
                                                      ("hnsw", 0.9, {"hnsw_m": 4, "ef_search": 10})])
def test_approximate_recall(index, floor, extra):
    rng = np.random.default_rng(3)
    db, q = _clustered(rng, 4000, 400)
    db_ids = np.array([f"i{i}" for i in range(len(db))], dtype=object)
    k = 10
    cfg = _cfg("local", k=k, shards=2, index=index, recall_sample=1000, query_batch_size=128, **extra)
    res = search(db_ids, db, _batches(np.arange(len(q)), q, [150]), cfg)
    ref_ids, _ = knn_numpy(db_ids, db, q, k)
    true_recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(res.ids, ref_ids)])
    assert res.recall_at_k is not None and res.recall_at_k >= floor
    assert res.recall_at_k == pytest.approx(true_recall)  # sample >= all queries: the measured recall is exact
    assert all(s["index"] == index for s in res.shard_stats)
    # a smaller seeded sample is reproducible and close
    small = search(db_ids, db, [(np.arange(len(q)), q)], dataclasses.replace(cfg, recall_sample=100))
    again = search(db_ids, db, [(np.arange(len(q)), q)], dataclasses.replace(cfg, recall_sample=100))
    assert small.recall_at_k == again.recall_at_k
    assert abs(small.recall_at_k - true_recall) < 0.1


def test_ivf_clamps_for_small_data(data):
    db_ids, db, q_ids, q = data
    res = search(db_ids[:100], db[:100], [(q_ids, q)], KnnConfig(k=5, index="ivf", nlist=1024, nprobe=32))
    assert res.shard_stats[0]["nlist"] == 2 and res.shard_stats[0]["nprobe"] == 2  # 100 // 39 lists
    assert res.recall_at_k == 1.0  # all lists probed: exact


def test_merge_topk_orders_by_score_then_key():
    s1 = np.array([[0.9, 0.5]], np.float32)
    k1 = np.array([[5, 3]])
    s2 = np.array([[0.5, 0.1, -np.inf]], np.float32)
    k2 = np.array([[1, 0, np.iinfo(np.int64).max]])
    s, k = merge_topk([s1, s2], [k1, k2], 4)
    assert k.tolist() == [[5, 1, 3, 0]] and s.tolist()[0] == pytest.approx([0.9, 0.5, 0.5, 0.1])
    s, k = merge_topk([s1], [k1], 3)
    assert s[0, 2] == -np.inf and k[0, 2] == np.iinfo(np.int64).max


def test_merge_topk_equals_a_lexsort_of_everything():
    """Scores of both signs with many ties (and -0.0 beside 0.0), padding, unique keys per row: the packed
    partition-and-sort gives exactly the two-key sort's top k."""
    rng = np.random.default_rng(7)
    scores = rng.choice(np.array([-0.5, -0.0, 0.0, 0.25, 0.25000003, 1.0, -np.inf], np.float32), size=(300, 40))
    keys = np.argsort(rng.random((300, 40)), axis=1) * 1000 + 3
    keys[scores == -np.inf] = np.iinfo(np.int64).max
    for k in (1, 7, 40, 45):
        got_s, got_k = merge_topk([scores[:, :25], scores[:, 25:]], [keys[:, :25], keys[:, 25:]], k)
        order = np.lexsort((keys, -(scores + np.float32(0))), axis=1)[:, :k]
        want_s, want_k = np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)
        real = want_s[:, : min(k, 40)] != -np.inf  # among padding, any order of pad keys is the same
        assert np.array_equal(got_s[:, :40], want_s[:, :40]) and np.array_equal(got_k[:, :40][real], want_k[real])
        assert (got_s[:, 40:] == -np.inf).all()


@pytest.mark.parametrize(
    ("args", "cfg", "message"),
    [
        (lambda d, i, q, qi: (i, d, [(qi, q[:, :5])]), KnnConfig(), "dim 5"),
        (lambda d, i, q, qi: (i[:0], d[:0], [(qi, q)]), KnnConfig(), "empty"),
        (lambda d, i, q, qi: (i[:10], d, [(qi, q)]), KnnConfig(), "10 ids"),
        (lambda d, i, q, qi: (i, d[0], [(qi, q)]), KnnConfig(), "2-D"),
        (lambda d, i, q, qi: (np.array(["a"] * len(d), dtype=object), d, [(qi, q)]), KnnConfig(), "unique"),
        (lambda d, i, q, qi: (i, np.where(d > 0.3, np.nan, d), [(qi, q)]), KnnConfig(), "NaN"),
        (lambda d, i, q, qi: (i, d, [(qi[:3], q)]), KnnConfig(), "query batch 0 ids"),
        (lambda d, i, q, qi: (i, d, [q]), KnnConfig(), "not an (ids, vectors) pair"),
        (lambda d, i, q, qi: (None, d, [(qi, q)]), KnnConfig(), "iterable of (ids, vectors)"),
        (lambda d, i, q, qi: (i, d.astype(str), [(qi, q)]), KnnConfig(), "numeric"),
    ],
)
def test_bad_input(data, args, cfg, message):
    db_ids, db, q_ids, q = data
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        search(*args(db[:50], db_ids[:50], q[:4], q_ids[:4]), cfg)


def test_ids_sort_by_their_bytes_as_arrow_sorts_them():
    """Index keys follow Arrow's (byte) order of the ids, the order the rankings' queries are written in; "a" and
    "a\\x00" are two ids (a numpy unicode array would drop the NUL and call them duplicates); numbers stay numbers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from newsclip.retrieval.search import Index

    ids = np.array(["b", "a\x00", "é", "a", "Z", "𝔸", "aa"], object)
    vectors = np.random.default_rng(0).standard_normal((len(ids), 4)).astype(np.float32)
    with Index(ids, vectors, KnnConfig(k=3)) as index:
        arrow = pa.array(ids)
        assert index.sorted_ids.tolist() == arrow.take(pc.sort_indices(arrow)).to_pylist() \
            == ["Z", "a", "a\x00", "aa", "b", "é", "𝔸"]
    with Index(np.array([30, 2, 11]), vectors[:3], KnnConfig(k=3)) as index:
        assert index.sorted_ids.tolist() == [2, 11, 30]


@pytest.mark.parametrize(("key", "value"), [("k", 0), ("shards", 0), ("index", "lsh"), ("backend", "dask"),
                                            ("max_shard_rows", 0), ("query_batch_size", -1), ("recall_sample", -1),
                                            ("engine", "numpy"), ("target_recall", 1.5), ("target_recall", 0)])
def test_bad_config(key, value):
    with pytest.raises(ValueError, match=f"KnnConfig.{key}"):
        KnnConfig(**{key: value})
    with pytest.raises(ValueError, match="KnnConfig.engine: torch searches exactly: it needs index 'flat'"):
        KnnConfig(engine="torch", index="ivf")


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_incremental_merge_equals_a_full_ranking(engine):
    import pyarrow as pa

    from newsclip.retrieval.nightly import NightlyMerge, added_rows
    from newsclip.retrieval.search import Index

    # one query; full scores a .9, b .5, c .5, d .7, e .5; last run ranked a, b, c; d and e are new: e ties the
    # last k-th score, so it is a candidate, and loses the tie to b by id
    previous = pa.table({"article_id": ["q"], "image_ids": [["a", "b", "c"]], "scores": [[0.9, 0.5, 0.5]],
                         "query_hash": ["hq"]},
                        schema=pa.schema([("article_id", pa.string()), ("image_ids", pa.list_(pa.string())),
                                          ("scores", pa.list_(pa.float32())), ("query_hash", pa.string())]))
    last_database = pa.table({"id": list("abc"), "hash": list("ABC")})
    database = pa.table({"id": list("abcde"), "hash": list("ABCDE")})
    assert added_rows(last_database, database).tolist() == [False, False, False, True, True]
    query = np.array([[1.0, 0.0]], np.float32)
    added = np.array([[0.5, 0.75 ** 0.5], [0.7, 0.51 ** 0.5]], np.float32)  # e, d: scores .5 and .7
    sorted_ids = pa.array(list("abcde"))
    with Index(np.array(["e", "d"], object), added, _cfg("local", engine, k=3)) as index:
        assert sorted(index.above(query, np.array([0.5]))[1][0].tolist()) == [0.5, pytest.approx(0.7)]
        nightly = NightlyMerge(iter(previous.to_batches()), last_database, database, sorted_ids, index, 3,
                               "article_id", "image_ids")
        merged, keys, scores = nightly.merge(pa.array(["q"]), pa.array(["hq"]), query)
    assert merged.tolist() == [True]
    full = sorted(zip([-0.9, -0.5, -0.5, -0.7, -0.5], "abcde"))[:3]  # score desc, then id asc
    assert sorted_ids.take(pa.array(keys[0])).to_pylist() == [i for _, i in full] == ["a", "d", "b"]
    assert scores.tolist() == [[pytest.approx(-s) for s, _ in full]]


def test_a_query_whose_content_or_last_top_k_changed_is_not_merged():
    import pyarrow as pa

    from newsclip.retrieval.nightly import NightlyMerge

    last = pa.table({"article_id": ["p", "q", "r"], "image_ids": [["a", "b"], ["b", "c"], ["a", "c"]],
                     "scores": pa.array([[0.75, 0.5]] * 3, pa.list_(pa.float32())), "query_hash": ["hp", "hq", "hr"]})
    last_database = pa.table({"id": list("abc"), "hash": list("ABC")})
    database = pa.table({"id": list("ab"), "hash": ["A", "B"]})  # c deleted
    nightly = NightlyMerge(iter(last.to_batches(max_chunksize=1)), last_database, database, pa.array(list("ab")),
                           None, 2, "article_id", "image_ids")
    vectors = np.zeros((4, 2), np.float32)
    # p unchanged and intact; q and r ranked c, which is gone; s has no last ranking
    merged, keys, scores = nightly.merge(pa.array(["p", "q"]), pa.array(["hp", "hq"]), vectors[:2])
    assert merged.tolist() == [True, False] and keys.tolist() == [[0, 1]] and scores.tolist() == [[0.75, 0.5]]
    merged, keys, _ = nightly.merge(pa.array(["r", "s"]), pa.array(["hr", "hs"]), vectors[2:])
    assert merged.tolist() == [False, False] and keys.shape == (0, 2)
    changed = NightlyMerge(iter(last.to_batches()), last_database, last_database, pa.array(list("abc")), None, 2,
                           "article_id", "image_ids")
    assert changed.merge(pa.array(["p", "q"]), pa.array(["hp-new", "hq"]), vectors[:2])[0].tolist() == [False, True]


def test_keys_are_positions_in_the_sorted_ids_found_by_hash(monkeypatch):
    import polars as pl
    import pyarrow as pa

    from newsclip.retrieval.nightly import IdPositions

    ids = np.array([f"img-{i:05d}" for i in range(5000)] + ["é", "z\u00ff", "𝔸"], object)
    sorted_ids = pa.array(np.sort(ids.astype(str)).astype(object), pa.string())
    wanted = pa.array(np.random.default_rng(0).choice(ids, 3000).astype(object), pa.string())
    keys = IdPositions(sorted_ids).of(wanted)
    assert keys.dtype == np.int64 and sorted_ids.take(pa.array(keys)).equals(wanted)
    # every id hashing alike (collisions): the positions are still right
    monkeypatch.setattr(pl.Series, "hash", lambda self, seed=0: pl.Series(np.zeros(len(self), np.uint64)))
    assert sorted_ids.take(pa.array(IdPositions(sorted_ids).of(wanted))).equals(wanted)


@pytest.mark.parametrize(("shards", "backend", "engine"),
                         [(1, "local", "faiss"), (3, "local", "faiss"), (3, "ray", "faiss"), (1, "local", "torch"),
                          (3, "local", "torch-fp16")], indirect=["engine"])
def test_above_finds_every_row_at_or_over_the_floor(data, shards, backend, engine, monkeypatch, request):
    from newsclip.retrieval import search as knn_search
    from newsclip.retrieval import torch_search

    if backend == "ray":
        request.getfixturevalue("ray_local")

    db_ids, db, q_ids, q = data
    db = np.concatenate([db, db[:50]])  # exact copies: rows that tie
    db_ids = np.concatenate([db_ids, [f"copy-{i}" for i in range(50)]])
    # in-process: matrix products of 7 columns at a time (FAISS's float32 products; torch's, 64 queries by 7 rows)
    monkeypatch.setattr(knn_search, "_ABOVE_BLOCK", 7 * len(q))
    monkeypatch.setattr(torch_search, "CPU_BLOCK_BYTES", 7 * 64 * 16)
    exact = (q.astype(np.float64) @ db.astype(np.float64).T).astype(np.float32)
    floors = np.sort(exact, axis=1)[:, -20]  # each query's 20th best score: ties at the floor count
    with knn_search.Index(db_ids, db, _cfg(backend, engine, shards=shards)) as index:
        keys, scores = index.above(q, floors)
        found = [set(index.sorted_ids[k[k != knn_search.PAD_KEY]]) for k in keys]
    assert found == [set(db_ids[exact[i] >= floors[i]]) for i in range(len(q))]
    assert all(len(f) >= 20 for f in found)
    assert np.array_equal(np.sort(scores, axis=1)[:, ::-1][:, :20], np.sort(exact, axis=1)[:, ::-1][:, :20])


@pytest.mark.parametrize("engine", ["torch", "torch-fp16"], indirect=True)
def test_torch_in_blocks_of_queries_and_rows_ranks_as_faiss_does(data, engine, monkeypatch):
    """The database split into blocks of 50 rows (a block's k-th is not the query's), near ties included."""
    from newsclip.retrieval import torch_search

    db_ids, db, q_ids, q = data
    db = np.concatenate([db, db[:300] + np.float32(1e-7), db[:100]])  # copies, and near-copies (within fp16 error)
    db_ids = np.concatenate([db_ids, [f"near-{i}" for i in range(300)], [f"copy-{i}" for i in range(100)]])
    want = search(db_ids, db, [(q_ids, q)], KnnConfig(k=25, engine="faiss"))
    monkeypatch.setattr(torch_search, "CPU_BLOCK_BYTES", 50 * 64 * 16)
    got = search(db_ids, db, [(q_ids, q)], KnnConfig(k=25, engine="torch"))
    assert (got.ids == want.ids).all() and np.array_equal(got.scores, want.scores)


def test_torch_device_rescoring_falls_back_to_the_cpu_score_where_rounding_could_differ(data):
    """Every pair sent to the fallback (an error bound made huge): the scores are still `exact_scores`' own."""
    from newsclip.retrieval.exact_scores import exact_scores
    from newsclip.retrieval.torch_search import TorchRows

    db_ids, db, q_ids, q = data
    labels = np.random.default_rng(0).integers(-1, len(db), (len(q), 40))
    rows = TorchRows(db, "cpu", 1e30)
    rows.half = True  # the GPU recipe's re-scoring, on the CPU
    rows.rows32 = rows.rows
    assert np.array_equal(rows.rescore(q, labels), exact_scores(db, q, labels))
    assert np.array_equal(TorchRows(db, "cpu", 1.0).rescore(q, labels), exact_scores(db, q, labels))


def test_exact_scores_do_not_depend_on_the_batch_shape():
    """What the GPU recipe's fallback relies on: one pair re-scored alone scores as it does among others."""
    from newsclip.retrieval.exact_scores import exact_scores

    rng = np.random.default_rng(1)
    for d in (7, 512, 768):
        rows, q = rng.standard_normal((500, d)).astype(np.float32), rng.standard_normal((40, d)).astype(np.float32)
        labels = rng.integers(0, 500, (40, 60))
        r, c = np.nonzero(np.ones(labels.shape, bool))
        alone = exact_scores(rows, q[r], labels[r, c][:, None])[:, 0].reshape(labels.shape)
        assert np.array_equal(exact_scores(rows, q, labels), alone)


def test_auto_picks_faiss_gpu_then_torch_on_gpus_then_the_cpu_engine(monkeypatch):
    from types import SimpleNamespace

    from newsclip.retrieval import search as knn_search

    def world(faiss_gpus: int | None, torch_gpu: bool | None):
        faiss = None if faiss_gpus is None else SimpleNamespace(StandardGpuResources=object,
                                                                get_num_gpus=lambda: faiss_gpus)
        torch = None if torch_gpu is None else SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: torch_gpu))
        monkeypatch.setattr(knn_search, "_module", lambda name: {"faiss": faiss, "torch": torch}[name])

    flat, ivf = KnnConfig(), KnnConfig(index="ivf")
    world(1, True)
    assert knn_search.engine_for(flat, use_gpu=True) == "faiss"
    assert knn_search.engine_for(flat, use_gpu=False) == knn_search.CPU_ENGINE == "faiss"
    world(0, True)  # faiss without a GPU it can use (the CUDA 13 machines)
    assert knn_search.engine_for(flat, use_gpu=True) == "torch"
    assert knn_search.engine_for(ivf, use_gpu=True) == "faiss"  # approximate indexes are FAISS's
    world(None, True)  # no faiss at all
    assert knn_search.engine_for(flat, use_gpu=True) == knn_search.engine_for(flat, use_gpu=False) == "torch"
    world(0, False)
    assert knn_search.engine_for(flat, use_gpu=True) == "faiss"
    assert knn_search.engine_for(KnnConfig(engine="torch"), use_gpu=True) == "torch"


@pytest.mark.parametrize(("index", "extra"), [("ivf", {"nlist": 64}), ("hnsw", {"hnsw_m": 4, "ef_construction": 20})])
def test_target_recall_chooses_the_smallest_knob_that_reaches_it(index, extra):
    from newsclip.retrieval.search import Index

    rng = np.random.default_rng(3)
    db, q = _clustered(rng, 4000, 300, noise=0.3)
    db_ids = np.array([f"i{i}" for i in range(len(db))], dtype=object)
    cfg = KnnConfig(k=30, index=index, shards=2, **extra)
    with Index(db_ids, db, cfg) as search_index:
        tuning = search_index.tune(q[:150], 0.95)
        tried = {int(v): r for v, r in tuning["tried"].items()}
        value = tuning["value"]
        assert tuning["knob"] == {"ivf": "nprobe", "hnsw": "ef_search"}[index] and tuning["reached"]
        assert tried[value] >= 0.95 and tuning["sample_recall"] == tried[value] and tuning["sample"] == 150
        below = [v for v in tried if v < value]
        assert all(tried[v] < 0.95 for v in below) and value - max(below) <= max(1, max(below) // 16)
        assert min(tried.values()) < 0.95  # the start missed: the choice meant something
        assert all(s[tuning["knob"]] == value for s in search_index.stats())
        search_index.search(q[150:])  # the full search runs with it, and measures its own recall
        assert search_index.recall_at_k() > 0.85


def test_the_database_streams_its_vectors_once_per_id(tmp_path):
    import pyarrow as pa

    from newsclip.runtime.embedding_folders import DatabaseFolder
    from newsclip.runtime.store import embedding_table, write_table

    vectors = np.arange(12, dtype=np.float32).reshape(6, 2)
    for part, (ids, rows) in enumerate([(["b", "a", "c"], [0, 1, 2]), (["a", "d", "e"], [3, 4, 5])]):
        table = embedding_table(ids, vectors[rows], "image_id").append_column("hash", pa.array(ids))
        write_table(table, tmp_path / f"part-{part}.parquet")
    db = DatabaseFolder(tmp_path, "image_id")
    assert db.table.column("id").to_pylist() == ["b", "a", "c", "d", "e"]  # the second "a" is left out

    def read(rows=None):
        ids, vecs = zip(*db.chunks(rows))
        return np.concatenate(ids).tolist(), np.concatenate(vecs)

    ids, vecs = read()
    assert ids == ["b", "a", "c", "d", "e"] and np.array_equal(vecs, vectors[[0, 1, 2, 4, 5]])
    ids, vecs = read(np.array([False, True, False, True, False]))
    assert ids == ["a", "d"] and np.array_equal(vecs, vectors[[1, 4]])


@pytest.mark.parametrize(("spill", "engine"), [(False, "faiss"), (True, "faiss"), (False, "torch"),
                                               (True, "torch-fp16")], indirect=["engine"])
def test_a_nightly_rank_merges_into_the_last_top_k_as_a_full_rank_would(tmp_path, monkeypatch, spill, engine):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from newsclip import config
    from newsclip.names import encode_entry
    from newsclip.runtime import embedding_folders
    from newsclip.runtime.store import embedding_table, record_stage, write_table
    from newsclip.stages import knn

    if spill:  # queries put in id order through spill files of 3 rows, searched and merged 2 at a time
        monkeypatch.setattr(embedding_folders, "ORDER_BYTES", 3 * 8 * 4)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def embeddings(side: str, id_name: str, ids: list[str], rows: list[int]) -> None:
        table = embedding_table(ids, vectors[rows], id_name)
        path = tmp_path / "embeddings" / "demo-tiny" / side / "part-0.parquet"
        write_table(table.append_column("hash", pa.array([f"h{r}" for r in rows], pa.string())), path)
        record_stage(tmp_path, encode_entry("demo-tiny", side), [path], store=f"store-{side}")

    # query ids written out of order: the rankings come out in id order all the same
    embeddings("texts", "article_id", [f"q{i}" for i in (3, 0, 5, 1, 4, 2)], list(range(6)))
    embeddings("images", "image_id", [f"i{i:02d}" for i in range(10)], list(range(6, 16)))
    cfg = config.load(None, [f"output_dir={tmp_path}", "eval.k=3", "backbones=[demo-tiny]", "fusion=[]",
                             "eval.directions=[text_to_image]", f"knn.query_batch_size={2 if spill else 4096}",
                             f"knn.engine={engine.removesuffix('-fp16')}"])
    assert knn.run(cfg)[0]["merged"] == 0
    first = pq.read_table(tmp_path / "rankings" / "demo-tiny.parquet")
    assert first.column("article_id").to_pylist() == [f"q{i}" for i in range(6)]
    scores = vectors[:6] @ vectors[6:16].T  # the plain answer: score desc, then id asc
    top = [[f"i{j:02d}" for j in sorted(range(10), key=lambda j, r=row: (-r[j], j))[:3]] for row in scores]
    assert first.column("image_ids").to_pylist() == [top[i] for i in (1, 3, 5, 0, 4, 2)]

    # a night: i03 deleted, two images added; the queries whose top 3 held i03 are searched in full
    images = [i for i in range(10) if i != 3] + [10, 11]
    embeddings("images", "image_id", [f"i{i:02d}" for i in images], [6 + i for i in images])
    entry = knn.run(cfg)[0]
    assert entry["engine"] == engine.removesuffix("-fp16")
    held_i03 = sum("i03" in ranked for ranked in first.column("image_ids").to_pylist())
    assert entry["merged"] == 6 - held_i03 > 0 and entry["searched_in_full"] == held_i03
    assert entry["added_candidates"] == 2  # the merged queries were searched against the two added images only
    nightly = pq.read_table(tmp_path / "rankings" / "demo-tiny.parquet")
    tsv = (tmp_path / "rankings" / "demo-tiny.tsv").read_text()

    shutil.rmtree(tmp_path / "rankings")  # no last rankings: a full search
    assert knn.run(cfg)[0]["merged"] == 0
    assert pq.read_table(tmp_path / "rankings" / "demo-tiny.parquet").equals(nightly)
    assert (tmp_path / "rankings" / "demo-tiny.tsv").read_text() == tsv
    assert not list((tmp_path / ".staging").glob("*")) if (tmp_path / ".staging").exists() else True

    # rankings that were not ranked against the database file beside them are never merged into
    (tmp_path / "rankings" / "demo-tiny.database.parquet").write_bytes(b"")
    assert knn.run(cfg)[0]["merged"] == 0


def test_the_knn_stage_tunes_an_approximate_index_and_records_its_recall(tmp_path):
    """`knn.target_recall`: the knob chosen on a sample of the queries before the search, in the manifest entry with
    what was tried, and the search's own recall measured on another sample."""
    import pyarrow as pa

    from newsclip import config
    from newsclip.names import encode_entry
    from newsclip.runtime.store import embedding_table, record_stage, write_table
    from newsclip.stages import knn

    rng = np.random.default_rng(5)
    images, texts = _clustered(rng, 2000, 300, noise=0.3)
    for side, id_name, vectors in (("texts", "article_id", texts), ("images", "image_id", images)):
        ids = [f"{side[0]}{i:05d}" for i in range(len(vectors))]
        table = embedding_table(ids, vectors, id_name).append_column("hash", pa.array(ids, pa.string()))
        path = write_table(table, tmp_path / "embeddings" / "demo-tiny" / side / "part-0.parquet")
        record_stage(tmp_path, encode_entry("demo-tiny", side), [path], store=f"store-{side}")
    cfg = config.load(None, [f"output_dir={tmp_path}", "eval.k=20", "backbones=[demo-tiny]", "fusion=[]",
                             "eval.directions=[text_to_image]", "knn.index=ivf", "knn.nlist=40", "knn.shards=1",
                             "knn.target_recall=0.9", "knn.recall_sample=100"])
    entry = knn.run(cfg)[0]
    tuning = entry["tuning"]
    assert tuning["knob"] == "nprobe" and tuning["reached"] and tuning["sample"] == 100
    assert entry["knob"] == {"nprobe": tuning["value"]} and 1 < tuning["value"] < 40
    assert entry["recall_queries"] == 100 and entry["recall_at_k"] > 0.8 and entry["engine"] == "faiss"


def test_the_report_says_how_an_approximate_ranking_was_tuned_and_measured():
    from newsclip.report.notes import approximate_note

    row = {"backbone": "ViT-B/32", "direction": "text_to_image", "index": "ivf", "recall_at_k_vs_exact": 0.95312,
           "recall_queries": 1000, "knob": {"nprobe": 79}, "target_recall": 0.95}
    assert approximate_note(row, 100) == ("`ivf` index (nprobe 79, chosen for recall@100 >= 0.95 on a sample) for "
                                          "ViT-B/32 text_to_image: recall@100 0.9531 against exact search on 1,000 "
                                          "sampled queries")
    older = {"backbone": "b", "direction": "text_to_image", "index": "hnsw", "recall_at_k_vs_exact": 0.9}
    assert approximate_note(older, 10) == "`hnsw` index for b text_to_image: recall@10 0.9000 against exact search " \
                                          "on a sample of queries"
