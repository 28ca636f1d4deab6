"""Seeded bootstrap confidence intervals for MRR@k and Recall@K, and a paired bootstrap comparison of two backbones."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from newsclip.metrics import RECALL_KS, scores

B_DEFAULT = 1000  # resamples: enough for stable 2.5/97.5 percentiles (Efron & Tibshirani suggest >= 1000 for CIs)
ALPHA = 0.05  # 95% intervals
# resampled query indexes held at once (rows x queries): bounds memory to ~32 MB of int64 whatever n and B are
_MAX_CELLS = 4_000_000


def metric_names(recall_ks: tuple[int, ...] = RECALL_KS) -> list[str]:
    return ["mrr", *[f"recall@{c}" for c in recall_ks]]


def per_query(ranks: np.ndarray, k: int = 100, recall_ks: tuple[int, ...] = RECALL_KS) -> np.ndarray:
    """(n, 1 + len(recall_ks)) per-query values whose column means are `metrics.scores`: 1/rank, then hit@K."""
    ranks = np.asarray(ranks)
    within = (ranks > 0) & (ranks <= k)
    columns = [np.where(within, 1.0 / np.maximum(ranks, 1), 0.0)]
    columns += [((ranks > 0) & (ranks <= min(cut, k))).astype(np.float64) for cut in recall_ks]
    return np.stack(columns, axis=1)


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
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    result: dict[str, float] = {"n": point["n"]}
    for j, name in enumerate(names):
        # the percentile interval of a mean contains it except in freak draws; clamp so a table never shows it outside
        result[name] = point[name]
        result[f"{name}_lo"] = float(min(lo[j], point[name]))
        result[f"{name}_hi"] = float(max(hi[j], point[name]))
    return result


def bootstrap_ci(ranks: np.ndarray, k: int = 100, recall_ks: tuple[int, ...] = RECALL_KS, b: int = B_DEFAULT,
                 seed: int = 0, alpha: float = ALPHA) -> dict[str, float]:
    """Point estimates (`metrics.scores`) and percentile-bootstrap `<metric>_lo`/`_hi` over resampled queries."""
    ranks = np.asarray(ranks)
    boot = resampled_means(per_query(ranks, k, recall_ks), b, seed)
    return _intervals(scores(ranks, k, recall_ks), boot, metric_names(recall_ks), alpha)


def paired_bootstrap(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 100, b: int = B_DEFAULT, seed: int = 0,
                     alpha: float = ALPHA, metric: str = "mrr", recall_ks: tuple[int, ...] = RECALL_KS) -> dict:
    """Paired bootstrap of `metric`(A) - `metric`(B) on the same queries (both rank arrays aligned by query).

    Each resample draws queries once and scores both backbones on them, so the per-query correlation between A and B
    cancels and the interval is much narrower than two separate intervals would suggest. A beats B when the whole
    interval of the difference is above 0 (B beats A when below)."""
    ranks_a, ranks_b = np.asarray(ranks_a), np.asarray(ranks_b)
    if ranks_a.shape != ranks_b.shape:
        raise ValueError(f"paired ranks must be aligned by query; got {ranks_a.shape} and {ranks_b.shape}")
    column = metric_names(recall_ks).index(metric)
    diff = per_query(ranks_a, k, recall_ks)[:, column] - per_query(ranks_b, k, recall_ks)[:, column]
    return _paired_summary(diff, resampled_means(diff, b, seed)[:, 0], metric, b, seed, alpha)


def _paired_summary(diff: np.ndarray, boot: np.ndarray, metric: str, b: int, seed: int, alpha: float) -> dict:
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    if lo > 0:
        decision = "A beats B"
    elif hi < 0:
        decision = "B beats A"
    else:
        decision = "no significant difference"
    return {"metric": metric, "n": len(diff), "difference": float(diff.mean()), "lo": float(lo), "hi": float(hi),
            "share_a_better": float((boot > 0).mean()), "share_b_better": float((boot < 0).mean()),
            "decision": decision, "resamples": b, "seed": seed, "confidence": 1 - alpha}


def _source_seed(seed: int, source: str) -> int:
    # a stable per-source stream (crc32, not hash(): Python salts str hashes per process)
    return seed ^ zlib.crc32(source.encode())


def ci_rows(ranks_by_backbone: Mapping[str, np.ndarray], sources: np.ndarray | None, k: int = 100,
            direction: str = "text_to_image", b: int = B_DEFAULT, seed: int = 0, alpha: float = ALPHA,
            recall_ks: tuple[int, ...] = RECALL_KS) -> list[dict]:
    """Long-format rows (backbone, source `all` then each source, n, mrr, mrr_lo, mrr_hi, recall@5, ..., direction).

    Rank arrays are aligned by query (the same query order for every backbone, `sources` beside them). Every backbone
    is resampled with the same draws (seeded per source), so a backbone's interval does not depend on which others
    ran, and equals `bootstrap_ci` of its ranks alone with that source's seed."""
    names = metric_names(recall_ks)
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
        values = np.concatenate([per_query(r[mask], k, recall_ks) for r in ranks], axis=1)
        boot = resampled_means(values, b, _source_seed(seed, source))
        for i, backbone in enumerate(backbones):
            part = boot[:, i * len(names):(i + 1) * len(names)]
            results[backbone, source] = _intervals(scores(ranks[i][mask], k, recall_ks), part, names, alpha)
    return [{"backbone": backbone, "source": source, **results[backbone, source], "direction": direction}
            for backbone in backbones for source, _ in groups]


def ci_columns(recall_ks: tuple[int, ...] = RECALL_KS) -> list[str]:
    """metrics.csv columns: the first issue's long format unchanged (backbone, source, n, metrics, direction), then
    the intervals as extra columns (`mrr_lo, mrr_hi, recall@5_lo, ...`), so readers of the old columns still work."""
    return ["backbone", "source", "n", *metric_names(recall_ks), "direction",
            *[f"{m}{s}" for m in metric_names(recall_ks) for s in ("_lo", "_hi")]]


def paired_rows(ranks_by_backbone: Mapping[str, np.ndarray], k: int = 100, b: int = B_DEFAULT, seed: int = 0,
                alpha: float = ALPHA, metric: str = "mrr", direction: str = "text_to_image",
                recall_ks: tuple[int, ...] = RECALL_KS) -> list[dict]:
    """`paired_bootstrap` for every unordered pair of backbones (A is the one listed first), all pairs in one pass."""
    names = list(ranks_by_backbone)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    if not pairs:
        return []
    column = metric_names(recall_ks).index(metric)
    values = np.stack([per_query(np.asarray(ranks_by_backbone[name]), k, recall_ks)[:, column] for name in names], 1)
    diffs = np.stack([values[:, i] - values[:, j] for i, j in pairs], axis=1)
    boot = resampled_means(diffs, b, seed)
    return [{"a": names[i], "b": names[j], "direction": direction,
             **_paired_summary(diffs[:, p], boot[:, p], metric, b, seed, alpha)} for p, (i, j) in enumerate(pairs)]
