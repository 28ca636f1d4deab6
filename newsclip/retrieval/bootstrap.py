"""Seeded bootstrap confidence intervals for MRR@k and Recall@K, and paired comparisons of backbones: a bootstrap
interval of the difference and a sign-flip permutation test, decided as one Holm family."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from newsclip.retrieval.metrics import csv_metric_groups, metric_names, per_query, scores

B_DEFAULT = 1000  # resamples: enough for stable 2.5/97.5 percentiles (Efron & Tibshirani suggest >= 1000 for CIs)
ALPHA = 0.05  # 95% intervals
# resampled query indexes held at once (rows x queries): bounds memory to ~32 MB of int64 whatever n and B are
_MAX_CELLS = 4_000_000
# The paired test: with at most EXACT_UP_TO queries that differ, all 2**m sign patterns (~1M) are enumerated;
# otherwise FLIPS seeded random ones, whose p = (1 + count) / (1 + FLIPS) is at least 1e-4, under the 0.05/72 that
# Holm needs for 36 pairs of nine backbones in two directions.
EXACT_UP_TO = 20
FLIPS = 10_000


def _resample_counts(n: int, b: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (rows, n) counts: how often each query is drawn in each resample (with replacement), B rows in all.

    The draws depend only on (n, B, seed), so every backbone and every pair scored with the same seed sees the same
    resamples. A resample's mean is then one matrix product (counts @ values / n) for all metrics and backbones."""
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_CELLS // max(n, 1))
    for start in range(0, b, rows):
        m = min(rows, b - start)
        idx = rng.integers(0, n, size=(m, n))
        flat = (idx + (np.arange(m) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=m * n).reshape(m, n).astype(np.float64)


def resampled_means(values: np.ndarray, b: int = B_DEFAULT, seed: int = 0) -> np.ndarray:
    """(B, m) column means of `values` (n, m) over B resamples of its rows with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n = len(values)
    if n == 0:
        raise ValueError("no queries to resample")
    return np.concatenate([counts @ values for counts in _resample_counts(n, b, seed)]) / n


def _intervals(point: dict[str, float], boot: np.ndarray, names: list[str], alpha: float) -> dict[str, float]:
    """The point estimates and their percentile intervals, as they come: a freak draw may put a point estimate
    outside its interval, and the table then shows that rather than hiding it."""
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    result: dict[str, float] = {"n": point["n"]}
    for j, name in enumerate(names):
        result[name] = point[name]
        result[f"{name}_lo"] = float(lo[j])
        result[f"{name}_hi"] = float(hi[j])
    return result


def bootstrap_ci(ranks: np.ndarray, k: int = 100, b: int = B_DEFAULT, seed: int = 0,
                 alpha: float = ALPHA) -> dict[str, float]:
    """Point estimates (`metrics.scores`) and percentile-bootstrap `<metric>_lo`/`_hi` over resampled queries."""
    ranks = np.asarray(ranks)
    boot = resampled_means(per_query(ranks, k), b, seed)
    return _intervals(scores(ranks, k), boot, metric_names(k), alpha)


def paired_bootstrap(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 100, b: int = B_DEFAULT, seed: int = 0,
                     alpha: float = ALPHA, metric: str = "mrr", flips: int = FLIPS) -> dict:
    """Paired comparison of `metric`(A) - `metric`(B) on the same queries (both rank arrays aligned by query).

    The interval is a paired bootstrap: each resample draws queries once and scores both backbones on them, so the
    per-query correlation between A and B cancels and the interval is much narrower than two separate intervals
    would suggest. The p-value is a sign-flip permutation test (`sign_flip_p`). On its own (one decision), A beats
    B when p is below alpha; `paired_rows` corrects many comparisons."""
    ranks_a, ranks_b = np.asarray(ranks_a), np.asarray(ranks_b)
    if ranks_a.shape != ranks_b.shape:
        raise ValueError(f"paired ranks must be aligned by query; got {ranks_a.shape} and {ranks_b.shape}")
    column = metric_names(k).index(metric)
    diff = (per_query(ranks_a, k)[:, column] - per_query(ranks_b, k)[:, column])[:, None]
    (test,) = sign_flip_p(diff, flips, seed)
    summary = _paired_summary(diff[:, 0], resampled_means(diff, b, seed)[:, 0], test, metric, b, seed, alpha)
    return {**summary, "decision": _decision(summary["difference"], summary["p_value"], alpha)}


def sign_flip_p(diffs: np.ndarray, flips: int = FLIPS, seed: int = 0) -> list[dict]:
    """Two-sided sign-flip permutation test of "no difference" for each column of `diffs` (n queries, one column per
    pair): under it, each query's difference is as likely to have come with the other sign, so p is the share of
    sign patterns whose sum is at least as far from 0 as the observed one. Exact over all 2**m patterns of the m
    non-zero differences when m <= EXACT_UP_TO; otherwise `flips` random patterns of all n queries, drawn from
    (n, flips, seed) alone (the same for every pair, whichever others are compared), and p = (1 + count) /
    (1 + flips), the observed pattern counted once. Never 0, unlike a normal approximation at a standard error of 0.
    Returns per column {p_value, test, flips, differing}."""
    diffs = np.asarray(diffs, dtype=np.float64)
    observed = np.abs(diffs.sum(0))
    # sums of the same values in another order differ in the last bits: a pattern that ties the observed sum counts
    slack = 1e-9 * np.abs(diffs).sum(0)
    differing = (diffs != 0).sum(0)
    results: list[dict] = [{}] * diffs.shape[1]
    sampled = []
    for p in range(diffs.shape[1]):
        if differing[p] <= EXACT_UP_TO:
            sums = _all_signed_sums(diffs[:, p][diffs[:, p] != 0])
            count = int((np.abs(sums) >= observed[p] - slack[p]).sum())
            results[p] = {"p_value": count / len(sums), "test": "exact", "flips": len(sums)}
        else:
            sampled.append(p)
    if sampled:
        columns, bar = diffs[:, sampled], observed[sampled] - slack[sampled]
        total = columns.sum(0)
        counts = np.zeros(len(sampled), dtype=np.int64)
        for plus in _random_bits(len(diffs), flips, seed):  # 1: the sign kept, 0: flipped
            counts += (np.abs(2 * (plus @ columns) - total) >= bar).sum(0)
        for p, count in zip(sampled, counts):
            results[p] = {"p_value": (1 + int(count)) / (1 + flips), "test": "random flips", "flips": flips}
    return [{**r, "differing": int(m)} for r, m in zip(results, differing)]


def _all_signed_sums(values: np.ndarray) -> np.ndarray:
    """The 2**len(values) sums of +-values (len <= EXACT_UP_TO: at most ~1M of them)."""
    sums = np.zeros(1)
    for value in values:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def _random_bits(n: int, flips: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (rows, n) random 0/1 (as float64, for one matrix product), `flips` rows in all, each row from its own
    n bits of random bytes; bounded memory whatever n is."""
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_CELLS // max(n, 1))
    for start in range(0, flips, rows):
        packed = rng.integers(0, 256, size=(min(rows, flips - start), (n + 7) // 8), dtype=np.uint8)
        yield np.unpackbits(packed, axis=1, count=n).astype(np.float64)


def _paired_summary(diff: np.ndarray, boot: np.ndarray, test: dict, metric: str, b: int, seed: int,
                    alpha: float) -> dict:
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {"metric": metric, "n": len(diff), "difference": float(diff.mean()), "lo": float(lo), "hi": float(hi),
            "share_a_better": float((boot > 0).mean()), "share_b_better": float((boot < 0).mean()),
            "p_value": test["p_value"], "test": test["test"], "flips": test["flips"], "differing": test["differing"],
            "resamples": b, "seed": seed, "confidence": 1 - alpha}


def _decision(difference: float, p_value: float, alpha: float) -> str:
    if p_value >= alpha:
        return "no significant difference"
    return "A beats B" if difference > 0 else "B beats A"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: rejecting where adjusted p < alpha keeps the chance of any false
    "beats" among all the comparisons below alpha (Holm 1979)."""
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for step, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - step) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _source_seed(seed: int, source: str) -> int:
    # a stable per-source stream (crc32, not hash(): Python salts str hashes per process)
    return seed ^ zlib.crc32(source.encode())


def ci_rows(ranks_by_backbone: Mapping[str, np.ndarray], sources: np.ndarray | None, k: int = 100,
            direction: str = "text_to_image", b: int = B_DEFAULT, seed: int = 0, alpha: float = ALPHA) -> list[dict]:
    """Long-format rows (backbone, source `all` then each source, n, mrr, mrr_lo, mrr_hi, recall@1, ..., direction).

    Rank arrays are aligned by query (the same query order for every backbone, `sources` beside them). Every backbone
    is resampled with the same draws (seeded per source), so a backbone's interval does not depend on which others
    ran, and equals `bootstrap_ci` of its ranks alone with that source's seed."""
    names = metric_names(k)
    backbones = list(ranks_by_backbone)
    if not backbones:
        return []
    ranks = [np.asarray(ranks_by_backbone[name]) for name in backbones]
    n = len(ranks[0])
    if any(len(r) != n for r in ranks):
        raise ValueError(f"rank arrays must be aligned by query; lengths {[len(r) for r in ranks]}")
    groups = [("all", np.ones(n, dtype=bool))]
    if sources is not None:
        sources = np.asarray(sources, dtype=object)
        if len(sources) != n:
            raise ValueError(f"{n} ranks per backbone but {len(sources)} sources")
        groups += [(s, sources == s) for s in sorted(set(sources.tolist()))]
    results: dict[tuple[str, str], dict] = {}
    for source, mask in groups:
        # all backbones in one pass: one set of resampled counts, one matrix product
        values = np.concatenate([per_query(r[mask], k) for r in ranks], axis=1)
        boot = resampled_means(values, b, _source_seed(seed, source))
        for i, backbone in enumerate(backbones):
            part = boot[:, i * len(names):(i + 1) * len(names)]
            results[backbone, source] = _intervals(scores(ranks[i][mask], k), part, names, alpha)
    return [{"backbone": backbone, "source": source, **results[backbone, source], "direction": direction}
            for backbone in backbones for source, _ in groups]


def ci_columns(k: int = 100) -> list[str]:
    """The columns of `ci_rows` as metrics.csv orders them: the first contract's long format unchanged (backbone,
    source, n, its metrics, direction), then their intervals (`mrr_lo, mrr_hi, recall@5_lo, ...`), then each metric
    added since (recall@1) with its interval, so readers of the earlier columns still find them in place."""
    contract, added = csv_metric_groups(k)
    return ["backbone", "source", "n", *contract, "direction", *[f"{m}{s}" for m in contract for s in ("_lo", "_hi")],
            *[f"{m}{s}" for m in added for s in ("", "_lo", "_hi")]]


def paired_rows(ranks_by_backbone: Mapping[str, np.ndarray], k: int = 100, b: int = B_DEFAULT, seed: int = 0,
                alpha: float = ALPHA, metric: str = "mrr", direction: str = "text_to_image",
                flips: int = FLIPS) -> list[dict]:
    """`paired_bootstrap` for every unordered pair of backbones (A is the one listed first), all pairs in one pass,
    decided as one family (`decide_as_one_family`). A job's evaluate decides the rows of both directions together."""
    names = list(ranks_by_backbone)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    if not pairs:
        return []
    column = metric_names(k).index(metric)
    values = np.stack([per_query(np.asarray(ranks_by_backbone[name]), k)[:, column] for name in names], 1)
    diffs = np.stack([values[:, i] - values[:, j] for i, j in pairs], axis=1)
    boot = resampled_means(diffs, b, seed)
    tests = sign_flip_p(diffs, flips, seed)
    rows = [{"a": names[i], "b": names[j], "direction": direction,
             **_paired_summary(diffs[:, p], boot[:, p], tests[p], metric, b, seed, alpha)}
            for p, (i, j) in enumerate(pairs)]
    return decide_as_one_family(rows, alpha)


def decide_as_one_family(rows: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Decide paired rows (every pair, direction and metric that may print "beats") as one family: Holm-adjusted
    p-values (`p_holm`) below alpha, so that among all of them (36 pairs of nine backbones, in two directions: 72)
    the chance of any false "beats" stays at alpha; `comparisons` is the family's size. The intervals stay the
    unadjusted 1 - alpha intervals."""
    rows = [dict(row) for row in rows]
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        row.update(p_holm=adjusted, comparisons=len(rows), decision=_decision(row["difference"], adjusted, alpha))
    return rows
