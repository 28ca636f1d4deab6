"""Bootstrap intervals and the paired comparison, against the point estimates and synthetic ranks with known effects."""

import itertools

import numpy as np
import polars as pl
import pytest

from newsclip.retrieval.bootstrap import (
    _source_seed,
    bootstrap_ci,
    ci_columns,
    ci_rows,
    decide_as_one_family,
    holm,
    paired_bootstrap,
    paired_rows,
    resampled_means,
    sign_flip_p,
)
from newsclip.retrieval.metrics import metric_names, per_query, scores
from newsclip.retrieval.ranks import query_ranks, score_rankings


def synthetic_ranks(n: int, p_hit: float, seed: int) -> np.ndarray:
    """Ranks 1..100 (geometric-ish, small ranks likelier) with a share of misses (0)."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.geometric(0.15, n), 150)
    ranks[ranks > 100] = 0
    ranks[rng.random(n) > p_hit] = 0
    return ranks


def test_per_query_means_are_the_scores():
    ranks = np.array([1, 2, 0, 7, 100, 101, 15, 3])
    values = per_query(ranks, k=100).mean(axis=0)
    expected = scores(ranks, 100)
    assert values == pytest.approx([expected[m] for m in metric_names()])
    assert per_query(ranks, k=10).mean(axis=0) == pytest.approx([scores(ranks, 10)[m] for m in metric_names(10)])


def test_resampled_means_match_an_explicit_index_draw():
    values = np.arange(12, dtype=float).reshape(6, 2)
    boot = resampled_means(values, b=5, seed=3)
    idx = np.random.default_rng(3).integers(0, 6, size=(5, 6))  # the same draws, done the obvious way
    assert boot == pytest.approx(values[idx].mean(axis=1))


def _explicit_intervals(ranks: np.ndarray, b: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval done the obvious way: draw index rows with the same generator, score each resample."""
    idx = np.random.default_rng(seed).integers(0, len(ranks), size=(b, len(ranks)))
    boot = np.array([per_query(ranks[row]).mean(axis=0) for row in idx])
    return np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0)


def test_intervals_are_the_percentiles_of_known_resamples():
    ranks = synthetic_ranks(300, 0.8, seed=1)
    ci = bootstrap_ci(ranks, b=200, seed=7)
    lo, hi = _explicit_intervals(ranks, b=200, seed=7)
    assert [ci[f"{m}_lo"] for m in metric_names()] == pytest.approx(lo)
    assert [ci[f"{m}_hi"] for m in metric_names()] == pytest.approx(hi)
    assert all(ci[m] == scores(ranks)[m] for m in metric_names())
    assert bootstrap_ci(ranks, b=200, seed=8) != ci


def test_an_interval_that_misses_its_point_estimate_is_shown_as_it_is():
    # few, skewed queries and few resamples: some seeds give a percentile interval beside the mean; it is not widened
    ranks = np.array([1] + [0] * 19)  # a resample misses the one hit with chance 0.95^20 = 0.36
    outside = 0
    for seed in range(200):
        ci = bootstrap_ci(ranks, b=3, seed=seed)
        lo, hi = _explicit_intervals(ranks, b=3, seed=seed)
        assert (ci["mrr_lo"], ci["mrr_hi"]) == pytest.approx((lo[0], hi[0]))
        outside += not lo[0] <= ci["mrr"] <= hi[0]
    assert outside > 0


def test_intervals_shrink_with_n():
    small = bootstrap_ci(synthetic_ranks(200, 0.8, seed=2), b=400, seed=0)
    large = bootstrap_ci(synthetic_ranks(5000, 0.8, seed=2), b=400, seed=0)
    for name in metric_names():
        assert large[f"{name}_hi"] - large[f"{name}_lo"] < 0.6 * (small[f"{name}_hi"] - small[f"{name}_lo"])
    # the standard error of a mean: ~1/sqrt(n), so 25x the queries gives ~1/5 the width
    ratio = (large["mrr_hi"] - large["mrr_lo"]) / (small["mrr_hi"] - small["mrr_lo"])
    assert 0.12 < ratio < 0.35


def test_degenerate_ranks_give_a_zero_width_interval():
    ci = bootstrap_ci(np.ones(50, dtype=int), b=100)
    assert ci["mrr"] == ci["mrr_lo"] == ci["mrr_hi"] == 1.0


def test_paired_detects_a_real_difference_and_not_identical_ranks():
    n = 2000
    b_ranks = synthetic_ranks(n, 0.8, seed=4)
    a_ranks = b_ranks.copy()
    rng = np.random.default_rng(5)
    better = (rng.random(n) < 0.15) & (a_ranks > 1)  # A moves the truth to rank 1 on 15% of the articles
    a_ranks[better] = 1
    result = paired_bootstrap(a_ranks, b_ranks, b=1000, seed=0)
    assert result["decision"] == "A beats B"
    assert 0 < result["lo"] <= result["difference"] <= result["hi"]
    assert result["share_a_better"] == 1.0
    assert paired_bootstrap(b_ranks, a_ranks, b=1000, seed=0)["decision"] == "B beats A"

    same = paired_bootstrap(b_ranks, b_ranks.copy(), b=1000, seed=0)
    assert same["decision"] == "no significant difference"
    assert same["difference"] == same["lo"] == same["hi"] == 0 and same["share_a_better"] == 0

    # independent draws of the same quality: no decision (at the 5% level this seed is not a false positive)
    noise = paired_bootstrap(synthetic_ranks(n, 0.8, seed=6), synthetic_ranks(n, 0.8, seed=7), b=1000, seed=0)
    assert noise["decision"] == "no significant difference"
    assert noise["lo"] < 0 < noise["hi"]


def test_paired_needs_aligned_ranks():
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap(np.ones(3), np.ones(4))


def test_ci_rows_long_format_per_backbone_and_source():
    n = 300
    ranks = {"A": synthetic_ranks(n, 0.8, seed=1), "B": synthetic_ranks(n, 0.6, seed=2)}
    sources = np.array(["TW", "RSS", "RT"] * 100, dtype=object)
    rows = ci_rows(ranks, sources, k=100, b=200, seed=0)
    assert [(r["backbone"], r["source"]) for r in rows] == [(b, s) for b in "AB" for s in ("all", "RSS", "RT", "TW")]
    assert all(set(r) == set(ci_columns()) for r in rows)
    for row in rows:
        mask = np.ones(n, bool) if row["source"] == "all" else sources == row["source"]
        point = scores(ranks[row["backbone"]][mask])
        assert row["n"] == mask.sum() and row["mrr"] == point["mrr"]
    # the "all" rows are bootstrap_ci of each backbone alone with the per-source seed
    seed_all = _source_seed(0, "all")
    assert rows[0] == {"backbone": "A", "source": "all", **bootstrap_ci(ranks["A"], b=200, seed=seed_all),
                       "direction": "text_to_image"}
    # a backbone's interval does not depend on which other backbones were scored with it
    alone = ci_rows({"B": ranks["B"]}, sources, k=100, b=200, seed=0)
    assert alone == [r for r in rows if r["backbone"] == "B"]
    header = pl.DataFrame(rows).select(ci_columns()).write_csv().splitlines()[0]
    assert header.startswith("backbone,source,n,mrr,recall@5,recall@10,recall@20,recall@50,recall@100,direction,"
                             "mrr_lo,mrr_hi,recall@5_lo,recall@5_hi,")
    assert header.endswith(",recall@100_lo,recall@100_hi,recall@1,recall@1_lo,recall@1_hi")  # added: at the end


def test_paired_rows_equal_single_comparisons_then_holm_corrects_them():
    ranks = {name: synthetic_ranks(400, p, seed=i) for i, (name, p) in enumerate([("A", 0.9), ("B", 0.7), ("C", 0.5)])}
    rows = paired_rows(ranks, b=300, seed=1)
    assert [(r["a"], r["b"]) for r in rows] == [("A", "B"), ("A", "C"), ("B", "C")]
    for row in rows:
        single = paired_bootstrap(ranks[row["a"]], ranks[row["b"]], b=300, seed=1)
        assert row["difference"] == pytest.approx(single["difference"])
        assert (row["lo"], row["hi"], row["p_value"]) == pytest.approx((single["lo"], single["hi"], single["p_value"]))
    assert [r["p_holm"] for r in rows] == holm([r["p_value"] for r in rows])
    assert all(r["comparisons"] == 3 for r in rows)


def test_holm_by_hand():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.4, 0.9]) == [0.8, 0.9]


def test_many_comparisons_of_equals_make_no_decision_after_holm():
    # nine backbones of the same quality: 36 pairs, where uncorrected 5% tests would call some of them different
    ranks = {f"m{i}": synthetic_ranks(1000, 0.7, seed=100 + i) for i in range(9)}
    rows = paired_rows(ranks, b=1000, seed=0)
    assert len(rows) == 36
    assert any(r["p_value"] < 0.05 for r in rows)  # what the correction is for
    assert all(r["decision"] == "no significant difference" for r in rows)
    # a real difference still stands out from the family
    ranks["best"] = np.where(ranks["m0"] > 1, 1, ranks["m0"])
    rows = paired_rows(ranks, b=1000, seed=0)
    assert {r["decision"] for r in rows if r["b"] == "best"} == {"B beats A"}


def test_four_of_2000_queries_one_rank_better_is_not_a_difference():
    # the bootstrap standard error's normal tail gave p = 0.045 here ("A beats B"); the exact test gives 2/16:
    # all four differences positive, or all four negative
    b_ranks = synthetic_ranks(2000, 0.8, seed=8)
    a_ranks = b_ranks.copy()
    a_ranks[np.flatnonzero(b_ranks == 2)[:4]] = 1
    result = paired_bootstrap(a_ranks, b_ranks, b=1000, seed=0)
    assert (result["p_value"], result["test"], result["flips"], result["differing"]) == (0.125, "exact", 16, 4)
    assert result["decision"] == "no significant difference"


def test_a_standard_error_of_zero_is_not_a_p_of_zero():
    # five queries, each one rank better: every resample has the same mean (standard error 0, once p = 0)
    result = paired_bootstrap(np.ones(5, int), np.full(5, 2), b=200, seed=0)
    assert result["lo"] == result["hi"] == 0.5 and result["p_value"] == 2 / 32
    assert result["decision"] == "no significant difference"


def test_the_exact_test_counts_every_sign_pattern():
    rng = np.random.default_rng(9)
    diff = np.zeros((300, 1))
    diff[rng.choice(300, 9, replace=False), 0] = rng.normal(0.1, 0.3, 9)
    nonzero = diff[diff != 0]
    patterns = [abs(nonzero @ np.array(signs)) for signs in itertools.product([1, -1], repeat=9)]
    expected = sum(p >= abs(nonzero.sum()) - 1e-12 for p in patterns) / 512
    assert sign_flip_p(diff) == [{"p_value": pytest.approx(expected), "test": "exact", "flips": 512, "differing": 9}]
    assert sign_flip_p(np.zeros((10, 1))) == [{"p_value": 1.0, "test": "exact", "flips": 1, "differing": 0}]


def test_many_differences_take_seeded_random_flips_and_p_is_never_zero():
    a, b = synthetic_ranks(200, 0.8, seed=3), synthetic_ranks(200, 0.8, seed=4)
    diff = per_query(a)[:, :1] - per_query(b)[:, :1]
    (test,) = sign_flip_p(diff, flips=500, seed=2)
    bits = np.unpackbits(np.random.default_rng(2).integers(0, 256, size=(500, 25), dtype=np.uint8), axis=1)
    signs = 2 * bits.astype(int) - 1  # the same draws: 200 queries' signs from 25 random bytes a flip
    count = (np.abs(signs @ diff[:, 0]) >= abs(diff.sum()) - 1e-9 * np.abs(diff).sum()).sum()
    assert test == {"p_value": (1 + count) / 501, "test": "random flips", "flips": 500,
                    "differing": int((diff != 0).sum())}
    assert sign_flip_p(np.ones((50, 1)), flips=500)[0]["p_value"] == 1 / 501  # as far out as can be: still not 0
    assert paired_bootstrap(a, a.copy(), b=500)["p_value"] == 1.0


def test_both_directions_are_one_family():
    ranks = {name: synthetic_ranks(400, p, seed=i) for i, (name, p) in enumerate([("A", 0.9), ("B", 0.7), ("C", 0.5)])}
    rows = [*paired_rows(ranks, b=300, seed=1),
            *paired_rows({n: r[::-1] for n, r in ranks.items()}, b=300, seed=1, direction="image_to_text")]
    family = decide_as_one_family(rows)
    assert all(r["comparisons"] == 6 for r in family)
    assert [r["p_holm"] for r in family] == holm([r["p_value"] for r in rows])
    # each direction alone was a family of 3: its adjusted p-values were smaller
    assert all(f["p_holm"] >= r["p_holm"] for f, r in zip(family, rows)) and family[:3] != rows[:3]


def test_query_ranks_match_score_rankings():
    queries = pl.DataFrame({"article_id": ["a1", "a2", "a3", "a4"], "image_id": ["i1", "i2", "i3", "i1"],
                            "source": ["TW", "RT", "TW", "RT"]})
    rankings = pl.DataFrame({"article_id": ["a3", "a1", "a2"],
                             "image_ids": [["i1", "i3"], ["i1", "i2"], ["i3", "i1"]],
                             "scores": [[0.9, 0.8], [0.7, 0.6], [0.5, 0.4]]})
    ranks, sources = query_ranks(queries, rankings, k=2)
    assert ranks.tolist() == [1, 0, 2, 0] and sources.tolist() == ["TW", "RT", "TW", "RT"]
    expected = score_rankings(queries, rankings, 2)[0]
    assert scores(ranks, 2)["mrr"] == pytest.approx(expected["mrr"])

    reverse = pl.DataFrame({"image_id": ["i1", "i2", "i3"], "article_ids": [["a4", "a2"], ["a1", "a2"], ["a3", "a1"]],
                            "scores": [[0.9, 0.8], [0.7, 0.6], [0.5, 0.4]]})
    ranks, _ = query_ranks(queries, reverse, k=2, direction="image_to_text")
    assert ranks.tolist() == [1, 2, 1]  # i1: a4 is published with i1 too, so rank 1
    assert scores(ranks, 2)["mrr"] == pytest.approx(score_rankings(queries, reverse, 2, "image_to_text")[0]["mrr"])
