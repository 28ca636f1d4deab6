"""Fusion of rankings: RRF and the z-score mean against hand-computed cases and a numpy reference."""

import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from newsclip.names import fusion_name, fusion_slug, is_fusion, parse_fusion_name, slug
from newsclip.retrieval.fusion import Embeddings, exact_scores, fuse, rrf, zmean
from newsclip.runtime.fused_rankings import fuse_rankings
from newsclip.runtime.store import embedding_table, write_table


def table(rows: dict[str, tuple[list[str], list[float]]]) -> pl.DataFrame:
    return pl.DataFrame({"article_id": list(rows), "image_ids": [r[0] for r in rows.values()],
                         "scores": [r[1] for r in rows.values()]},
                        schema={"article_id": pl.String, "image_ids": pl.List(pl.String),
                                "scores": pl.List(pl.Float32)})


A = table({"q": (["x", "y", "z"], [0.9, 0.5, 0.1])})
B = table({"q": (["y", "w", "x"], [0.8, 0.6, 0.4])})


def test_names_and_slugs():
    assert fusion_name(["RN50x64", "ViT-L/14"]) == "fusion:RN50x64+ViT-L/14"
    assert fusion_name(["RN50x64", "ViT-L/14"], "rrf") == "fusion-rrf:RN50x64+ViT-L/14"
    assert parse_fusion_name("fusion:RN50x64+ViT-L/14") == ("zmean", ["RN50x64", "ViT-L/14"])
    assert parse_fusion_name("fusion-rrf:ViT-L/14@336px+RN50") == ("rrf", ["ViT-L/14@336px", "RN50"])
    assert fusion_slug("fusion:RN50x64+ViT-L/14") == slug("fusion:RN50x64+ViT-L/14") == "fusion-rn50x64-vit-l-14"
    assert fusion_slug("fusion-rrf:RN50x64+ViT-L/14") == "fusion-rrf-rn50x64-vit-l-14"
    # a checkpoint path as a member is slugged alone, so the fusion's files never take the member's name
    assert slug("fusion:demo-tiny+/models/random-rn.pt") == "fusion-demo-tiny-random-rn"
    assert slug("fusion-rrf:/models/a.v2.pt+RN50") == "fusion-rrf-a-v2-rn50"
    assert is_fusion("fusion:a+b") and not is_fusion("ViT-L/14") and not is_fusion("fusion")
    for bad in ("fusion:RN50", "RN50+RN101", "fusion:RN50+", "fusion-max:a+b"):
        with pytest.raises(ValueError):
            parse_fusion_name(bad)


def test_rrf_hand_computed():
    # rrf_k = 0: x 1/1 + 1/3, y 1/2 + 1/1, z 1/3, w 1/2  ->  y, x, w, z
    out = rrf([A, B], k=3, rrf_k=0)
    assert out["image_ids"].to_list() == [["y", "x", "w"]]
    assert out["scores"].to_list()[0] == pytest.approx([1.5, 4 / 3, 0.5], rel=1e-6)
    # rrf_k = 60 (the default): y 1/62 + 1/61 > x 1/61 + 1/63 > w 1/62 > z 1/63
    out = rrf([A, B], k=4)
    assert out["image_ids"].to_list() == [["y", "x", "w", "z"]]
    assert out["scores"].to_list()[0] == pytest.approx([1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62, 1 / 63], rel=1e-6)


def test_zmean_hand_computed_with_imputation():
    # union {w, x, y, z}; a candidate a backbone did not rank gets its k-th score (A: w = 0.1, B: z = 0.4)
    a = np.array([0.1, 0.9, 0.5, 0.1])  # w x y z
    b = np.array([0.6, 0.4, 0.8, 0.4])
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    fused = (za + zb) / 2  # w -0.3015, x 0.3015, y 0.9045, z -0.9045
    out = zmean([A, B], k=4)
    assert out["image_ids"].to_list() == [["y", "x", "w", "z"]]
    assert out["scores"].to_list()[0] == pytest.approx(fused[[2, 1, 0, 3]], abs=1e-6)


def test_zmean_rescores_and_falls_back_to_the_kth_score_for_ids_without_a_vector():
    # A's vectors reproduce its listed scores for x, y, z but it has none for w: w gets A's k-th score (0.1),
    # B has no embeddings at all: the same result as the hand-computed imputation case
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    c = np.array([[0.9, 0.1], [0.5, 0.2], [0.1, 0.3]], dtype=np.float32)
    emb = Embeddings(np.array(["q"], dtype=object), q, np.array(["x", "y", "z"], dtype=object), c)
    assert zmean([A, B], k=4, embeddings=[emb, None]).equals(zmean([A, B], k=4))
    # the re-scored value wins over the listed one: A's z becomes 0.95; w keeps the floor of A's *listed* scores
    c2 = c.copy()
    c2[2, 0] = 0.95
    out = zmean([A, B], k=4, embeddings=[Embeddings(emb.query_ids, q, emb.candidate_ids, c2), None])
    a, b = np.array([0.1, 0.9, 0.5, 0.95]), np.array([0.6, 0.4, 0.8, 0.4])  # w x y z
    fused = ((a - a.mean()) / a.std() + (b - b.mean()) / b.std()) / 2
    order = np.argsort(-fused, kind="stable")
    assert out["image_ids"].to_list()[0] == [list("wxyz")[i] for i in order]
    assert out["scores"].to_list()[0] == pytest.approx(fused[order], abs=1e-6)


def test_ties_break_by_id():
    left = table({"q": (["b", "a"], [0.9, 0.1])})
    right = table({"q": (["a", "b"], [0.9, 0.1])})
    assert rrf([left, right], k=2)["image_ids"].to_list() == [["a", "b"]]
    assert zmean([left, right], k=2)["image_ids"].to_list() == [["a", "b"]]


def test_pessimistic_ties_hold_under_rrf_where_copies_are_not_side_by_side():
    """i1 and i2 are byte-identical: each member ranks them side by side (a tie, by id), but RRF puts x between
    them. Pessimistically the truth i1 is after both copies: 3rd, not first + copies - 1 = 2nd."""
    from newsclip.retrieval.ranks import query_ranks

    one = table({"q": (["i1", "i2", "x"], [0.9, 0.9, 0.8])})
    two = table({"q": (["x", "i1", "i2"], [0.95, 0.9, 0.9])})
    fused = rrf([one, two], k=3)
    assert fused["image_ids"].to_list() == [["i1", "x", "i2"]]
    queries = pl.DataFrame({"article_id": ["q"], "image_id": ["i1"], "source": ["TW"]})
    hashes = pl.DataFrame({"image_id": ["i1", "i2", "x"], "image_hash": ["D", "D", "X"]})
    for ties, rank in {"id": 1, "optimistic": 1, "pessimistic": 3}.items():
        assert query_ranks(queries, fused, 3, ties=ties, image_hashes=hashes)[0].tolist() == [rank], ties
    assert query_ranks(queries, fused, 2, ties="pessimistic", image_hashes=hashes)[0].tolist() == [0]  # i2 past k


def random_case(n_queries=30, n_images=80, dims=(16, 24), k=10, seed=0):
    rng = np.random.default_rng(seed)
    q_ids = np.array([f"a{i:03d}" for i in range(n_queries)], dtype=object)
    c_ids = np.array([f"i{i:03d}" for i in range(n_images)], dtype=object)
    members = []
    for d in dims:
        q = rng.normal(size=(n_queries, d)).astype(np.float32)
        c = rng.normal(size=(n_images, d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        sims = q.astype(np.float64) @ c.astype(np.float64).T
        order = np.lexsort((np.broadcast_to(c_ids, sims.shape), -sims), axis=1)[:, :k]  # score desc, then id
        rankings = pl.DataFrame({"article_id": list(q_ids), "image_ids": [list(c_ids[o]) for o in order],
                                 "scores": [list(sims[i, o].astype(np.float32)) for i, o in enumerate(order)]})
        members.append((Embeddings(q_ids, q, c_ids, c), sims, rankings))
    return q_ids, c_ids, members


def test_zmean_with_embeddings_matches_a_numpy_reference():
    k = 10
    q_ids, c_ids, members = random_case(k=k)
    out = zmean([m[2] for m in members], k=k, embeddings=[m[0] for m in members])
    assert out["article_id"].to_list() == sorted(q_ids)
    for i, (_article, ranked, fused_scores) in enumerate(out.iter_rows()):
        union = sorted(set().union(*(set(m[2]["image_ids"][i]) for m in members)))
        cols = [list(c_ids).index(c) for c in union]
        z = [(m[1][i, cols] - m[1][i, cols].mean()) / m[1][i, cols].std() for m in members]
        fused = np.mean(z, axis=0)
        order = sorted(range(len(union)), key=lambda j: (-fused[j], union[j]))[:k]
        assert ranked == [union[j] for j in order]
        assert fused_scores == pytest.approx(fused[order], abs=1e-5)


def test_exact_scores_and_missing_ids():
    _, _, members = random_case(n_queries=3, n_images=5, dims=(8,))
    emb, sims, _ = members[0]
    got = exact_scores(pl.Series(["a001", "a002", "zz", "a000"]), pl.Series(["i004", "i000", "i001", "nope"]), emb)
    assert got[:2] == pytest.approx([sims[1, 4], sims[2, 0]], abs=1e-6)
    assert np.isnan(got[2:]).all()


@pytest.mark.parametrize("method", ["zmean", "rrf"])
def test_fusing_a_backbone_with_itself_gives_its_ranking(method):
    _, _, members = random_case(dims=(16,))
    emb, _, rankings = members[0]
    for embeddings in (None, [emb, emb]):
        out = fuse([rankings, rankings], method, k=10, embeddings=embeddings)
        expected = rankings.sort("article_id")
        assert out["image_ids"].to_list() == expected["image_ids"].to_list()


def test_image_to_text_columns():
    left = pl.DataFrame({"image_id": ["i1"], "article_ids": [["a", "b"]], "scores": [[0.5, 0.4]]})
    out = rrf([left, left], k=2, query_col="image_id", list_col="article_ids")
    assert out.columns == ["image_id", "article_ids", "scores"] and out["article_ids"].to_list() == [["a", "b"]]


def test_fuse_rankings_writes_rankings_under_the_fusion_slug(tmp_path):
    k = 5
    _, _, members = random_case(n_queries=8, n_images=20, k=k)
    names = ["RN50", "ViT-B/32"]
    for name, (emb, _, rankings) in zip(names, members):
        # the members' rankings carry each query's content hash (the same for every backbone)
        hashed = rankings.with_columns(query_hash=pl.lit("h-") + pl.col("article_id"))
        write_table(hashed.to_arrow(), tmp_path / "rankings" / f"{slug(name)}.parquet")
        write_table(embedding_table(emb.query_ids, emb.query_vectors, "article_id"),
                    tmp_path / "embeddings" / slug(name) / "texts" / "part-0.parquet")
        write_table(embedding_table(emb.candidate_ids, emb.candidate_vectors, "image_id"),
                    tmp_path / "embeddings" / slug(name) / "images" / "part-0.parquet")
    cfg = SimpleNamespace(output=tmp_path, eval=SimpleNamespace(k=k))
    for method in ("zmean", "rrf"):
        name = fusion_name(names, method)
        entry = fuse_rankings(cfg, name)
        stem = tmp_path / "rankings" / slug(name)
        written = pl.read_parquet(f"{stem}.parquet")
        expected = fuse([m[2] for m in members], method, k, embeddings=[m[0] for m in members])
        assert written["image_ids"].to_list() == expected["image_ids"].to_list()
        assert written.schema["scores"] == pl.List(pl.Float32)
        assert written["query_hash"].to_list() == ["h-" + q for q in written["article_id"]]
        lines = (tmp_path / "rankings" / f"{slug(name)}.tsv").read_text().splitlines()
        assert lines[0].split("\t") == [written["article_id"][0], *written["image_ids"][0]]
        assert entry["members"] == names and entry["method"] == method
        assert entry["rescored"] == ([True, True] if method == "zmean" else None)
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert {"knn:fusion-rn50-vit-b-32:text_to_image", "knn:fusion-rrf-rn50-vit-b-32:text_to_image"} <= set(stages)

    # image to text: images query the texts; re-scored from the same folders, the sides swapped
    for name, (emb, sims, _) in zip(names, members):
        order = np.argsort(-sims.T, axis=1, kind="stable")[:, :k]
        reverse = pl.DataFrame({"image_id": list(emb.candidate_ids),
                                "article_ids": [list(emb.query_ids[o]) for o in order],
                                "scores": [list(sims.T[i, o].astype(np.float32)) for i, o in enumerate(order)]})
        write_table(reverse.to_arrow(), tmp_path / "rankings" / f"{slug(name)}.image_to_text.parquet")
    entry = fuse_rankings(cfg, fusion_name(names), "image_to_text")
    written = pl.read_parquet(tmp_path / "rankings" / "fusion-rn50-vit-b-32.image_to_text.parquet")
    assert written.columns == ["image_id", "article_ids", "scores", "query_hash"] and len(written) == 20
    assert written["query_hash"].null_count() == 20  # the members' files carry none
    assert entry["rescored"] == [True, True] and entry["direction"] == "image_to_text"
    swapped = [Embeddings(e.candidate_ids, e.candidate_vectors, e.query_ids, e.query_vectors) for e, _, _ in members]
    rankings = [pl.read_parquet(tmp_path / "rankings" / f"{slug(n)}.image_to_text.parquet") for n in names]
    expected = zmean(rankings, k, swapped, query_col="image_id", list_col="article_ids")
    assert written["article_ids"].to_list() == expected["article_ids"].to_list()
