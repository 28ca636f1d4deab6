"""Metrics against a case computed by hand."""

import numpy as np
import pytest

from newsclip.metrics import ranks_of_truth, scores


def test_hand_computed_case():
    ranked = np.array([["a", "b", "c"], ["c", "a", "b"], ["x", "y", "z"], ["b", "c", "a"]], dtype=object)
    truth = np.array(["a", "a", "a", "a"], dtype=object)
    ranks = ranks_of_truth(ranked, truth)
    assert ranks.tolist() == [1, 2, 0, 3]
    result = scores(ranks, k=3, recall_ks=(1, 2, 3))
    # reciprocal ranks 1, 1/2, 0 (absent), 1/3 over all four queries
    assert result["mrr"] == pytest.approx((1 + 0.5 + 0 + 1 / 3) / 4)
    assert result["recall@1"] == pytest.approx(0.25)
    assert result["recall@2"] == pytest.approx(0.5)
    assert result["recall@3"] == pytest.approx(0.75)
    assert result["n"] == 4


def test_rank_beyond_k_scores_zero():
    # rank 5 with k=4: out of the top k, so it counts for neither MRR nor recall
    result = scores(np.array([5, 1]), k=4, recall_ks=(4, 10))
    assert result["mrr"] == pytest.approx(0.5)
    assert result["recall@4"] == pytest.approx(0.5)
    assert result["recall@10"] == pytest.approx(0.5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one row per truth"):
        ranks_of_truth(np.array([["a"]], dtype=object), np.array(["a", "b"], dtype=object))


def test_image_to_text_counts_any_article_of_the_image():
    import polars as pl

    from newsclip.evaluate import score_rankings

    queries = pl.DataFrame({"article_id": ["a1", "a2", "a3"], "image_id": ["i1", "i1", "i2"],
                            "source": ["TW", "TW", "RT"]})
    rankings = pl.DataFrame({"image_id": ["i1", "i2"], "article_ids": [["a3", "a2", "a1"], ["a1", "a2", "a3"]]})
    rows = {r["source"]: r for r in score_rankings(queries, rankings, k=3, direction="image_to_text")}
    # i1: a2 (rank 2) is one of its articles -> 1/2; i2: a3 at rank 3 -> 1/3
    assert rows["all"]["n"] == 2 and rows["all"]["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert rows["RT"]["mrr"] == pytest.approx(1 / 3)


def test_text_to_image_query_without_ranking_is_a_miss():
    import polars as pl

    from newsclip.evaluate import score_rankings

    queries = pl.DataFrame({"article_id": ["a1", "a2"], "image_id": ["i1", "i2"], "source": ["TW", "TW"]})
    rankings = pl.DataFrame({"article_id": ["a1"], "image_ids": [["i1", "i2"]]})
    assert score_rankings(queries, rankings, k=2)[0]["mrr"] == pytest.approx(0.5)
