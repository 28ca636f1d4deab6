"""Metrics against a case computed by hand."""

import numpy as np
import pytest

from newsclip.retrieval.metrics import csv_metric_groups, metric_names, scores


def test_hand_computed_case():
    import polars as pl

    from newsclip.retrieval.ranks import query_ranks

    queries = pl.DataFrame({"article_id": ["q1", "q2", "q3", "q4"], "image_id": ["a"] * 4, "source": ["TW"] * 4})
    rankings = pl.DataFrame({"article_id": ["q1", "q2", "q3", "q4"],
                             "image_ids": [["a", "b", "c"], ["c", "a", "b"], ["x", "y", "z"], ["b", "c", "a"]]})
    ranks, _ = query_ranks(queries, rankings, k=3)
    assert ranks.tolist() == [1, 2, 0, 3]
    result = scores(ranks, k=3)
    # reciprocal ranks 1, 1/2, 0 (absent), 1/3 over all four queries
    assert result["mrr"] == pytest.approx((1 + 0.5 + 0 + 1 / 3) / 4)
    assert result["recall@1"] == pytest.approx(0.25)  # the 2022 task's P@1: one true image per article
    assert result["n"] == 4
    assert set(result) == {"n", "mrr", "recall@1"}  # k=3: no cut-off above k


def test_recall_at_each_cutoff_and_none_above_k():
    ranks = np.array([1, 3, 5, 7, 12, 25, 60, 100, 0, 2])
    result = scores(ranks, k=100)
    for cut, hits in {1: 1, 5: 4, 10: 5, 20: 6, 50: 7, 100: 9}.items():
        assert result[f"recall@{cut}"] == pytest.approx(hits / 10), cut
    # with k=30 a "recall@50" or "recall@100" would really be recall@30: they are not emitted
    assert metric_names(30) == ["mrr", "recall@1", "recall@5", "recall@10", "recall@20"]
    assert set(scores(ranks, k=30)) == {"n", *metric_names(30)}


def test_recall_at_1_goes_after_the_contract_columns():
    assert csv_metric_groups(100) == (["mrr", "recall@5", "recall@10", "recall@20", "recall@50", "recall@100"],
                                      ["recall@1"])
    assert csv_metric_groups(10) == (["mrr", "recall@5", "recall@10"], ["recall@1"])


def test_rank_beyond_k_scores_zero():
    # rank 5 with k=4: out of the top k, so it counts for neither MRR nor recall
    result = scores(np.array([5, 1]), k=4)
    assert result["mrr"] == pytest.approx(0.5)
    assert result["recall@1"] == pytest.approx(0.5)


def test_image_to_text_counts_any_article_of_the_image():
    import polars as pl

    from newsclip.retrieval.ranks import score_rankings

    queries = pl.DataFrame({"article_id": ["a1", "a2", "a3"], "image_id": ["i1", "i1", "i2"],
                            "source": ["TW", "TW", "RT"]})
    rankings = pl.DataFrame({"image_id": ["i1", "i2"], "article_ids": [["a3", "a2", "a1"], ["a1", "a2", "a3"]]})
    rows = {r["source"]: r for r in score_rankings(queries, rankings, k=3, direction="image_to_text")}
    # i1: a2 (rank 2) is one of its articles -> 1/2; i2: a3 at rank 3 -> 1/3
    assert rows["all"]["n"] == 2 and rows["all"]["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert rows["RT"]["mrr"] == pytest.approx(1 / 3)


def test_text_to_image_query_without_ranking_is_a_miss():
    import polars as pl

    from newsclip.retrieval.ranks import score_rankings

    queries = pl.DataFrame({"article_id": ["a1", "a2"], "image_id": ["i1", "i2"], "source": ["TW", "TW"]})
    rankings = pl.DataFrame({"article_id": ["a1"], "image_ids": [["i1", "i2"]]})
    assert score_rankings(queries, rankings, k=2)[0]["mrr"] == pytest.approx(0.5)


def test_exact_duplicates_of_the_truth_rank_as_eval_ties_says():
    import polars as pl

    from newsclip.retrieval.ranks import duplicate_truths, query_ranks

    # i2, i3, i4 are byte-identical (hash D), so are i5 and i6 (hash E): rankings list them side by side, in id order
    hashes = {"i1": "A", "i2": "D", "i3": "D", "i4": "D", "i5": "E", "i6": "E", "i7": "F", "i8": "G", "i9": "H"}
    image_hashes = pl.DataFrame({"image_id": list(hashes), "image_hash": list(hashes.values())})
    queries = pl.DataFrame({"article_id": ["a1", "a2", "a3"], "image_id": ["i3", "i6", "i9"], "source": ["TW"] * 3})
    lists = [["i1", "i2", "i3", "i4"], ["i7", "i8", "i9", "i5"], ["i9", "i1", "i2", "i3"]]
    rankings = pl.DataFrame({"article_id": ["a1", "a2", "a3"], "image_ids": lists})
    expected = {"id": [3, 0, 1],  # a2's truth i6 follows its copy i5 past the last slot
                "optimistic": [2, 4, 1],  # the first of the truth's copies
                "pessimistic": [4, 0, 1]}  # the last: a2's group runs past k, so the truth may be after it
    for ties, ranks in expected.items():
        got, _ = query_ranks(queries, rankings, k=4, ties=ties, image_hashes=image_hashes)
        assert got.tolist() == ranks, ties
    assert duplicate_truths(queries, image_hashes) == 2


def test_sampled_and_unscoreable_counts_per_source():
    import polars as pl

    from newsclip.retrieval.ranks import counts

    queries = pl.DataFrame({"article_id": ["a1", "a2", "a3", "a4"], "image_id": ["i1", "i1", "i2", "i3"],
                            "source": ["TW", "TW", "RT", "RT"]})
    assert counts(queries, "text_to_image") == {"all": 4, "TW": 2, "RT": 2}
    assert counts(queries, "image_to_text") == {"all": 3, "TW": 1, "RT": 2}  # one query per image
    assert counts(queries, "text_to_image", pl.Series(["i1"])) == {"all": 2, "TW": 2}


def test_a_checkpoint_carries_what_it_trained_on_and_a_job_leaves_that_out(tmp_path):
    """model.pt as newsclip finetune writes it: the weights and the record, read with weights_only; queries whose
    article or image bytes a recorded fine-tune saw are left out, for every backbone; a checkpoint without a record
    leaves nothing out and is `unknown`."""
    import polars as pl
    import torch

    from newsclip.retrieval.backbones import _load_state_dict
    from newsclip.retrieval.trained import (
        excluded_counts,
        leave_out_trained,
        read_training_record,
        save_checkpoint,
        training_record,
    )

    train = pl.DataFrame({"article_id": ["a2", "a1"], "image_hash": ["H2", "H1"]})
    validation = pl.DataFrame({"article_id": ["a5"], "image_hash": ["H5"]})
    record = training_record(train, validation, job="j", start="RN50", held_out=3)
    assert record["train"] == {"articles": ["a1", "a2"], "image_hashes": ["H1", "H2"]}
    path, plain = tmp_path / "model.pt", tmp_path / "plain.pt"
    with open(path, "wb") as f:
        save_checkpoint(f, {"w": torch.ones(2)}, record)
    torch.save({"w": torch.ones(2)}, plain)
    assert read_training_record(path) == record and read_training_record(plain) is None
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(2))
    with pytest.raises(ValueError, match="not an OpenAI-CLIP state dict"):  # the loader unwraps it as usual
        _load_state_dict(path)

    # a1 trained; a3's image has the bytes of a trained image (H2) under another id; a4 and a6 unseen
    queries = pl.DataFrame({"article_id": ["a1", "a3", "a4", "a6"], "image_id": ["i1", "i3", "i4", "i6"],
                            "source": ["TW", "TW", "RT", "RT"]})
    hashes = pl.DataFrame({"image_id": ["i1", "i3", "i4", "i6", "i2"], "image_hash": ["H1", "H2", "H4", "H6", "H2"],
                           "candidate": [True, True, True, True, False]})
    kept, facts = leave_out_trained(queries, hashes, {"/m/model.pt": record, "/m/other.pt": None})
    assert kept["article_id"].to_list() == ["a4", "a6"]
    assert facts == [{"backbone": "/m/model.pt", "training": "recorded", "start": "RN50", "job": "j",
                      "trained_articles": 3, "trained_images": 3, "n_excluded_trained": 2,
                      "trained_images_among_candidates": 2},
                     {"backbone": "/m/other.pt", "training": "unknown"}]
    assert excluded_counts(queries, kept, "text_to_image") == {"all": 2, "TW": 2, "RT": 0}
    assert leave_out_trained(queries, hashes, {"/m/other.pt": None})[0].equals(queries)
