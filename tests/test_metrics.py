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
