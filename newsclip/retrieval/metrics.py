"""Retrieval metrics as NewsImages scores them: MRR@k and Recall@K over all queries, and the metric names.

The one place that says which metrics exist: the report, the bootstrap, the CLI and `metrics.csv` take their
names from here."""

from __future__ import annotations

import numpy as np

# Recall@K cut-offs. R@1 is the 2022 task's P@1 (one true image per article); the paper reports 5 to 100.
CUTOFFS = (1, 5, 10, 20, 50, 100)
# metrics.csv's first columns, in the order of the first contract; cut-offs added since are appended at the end
CONTRACT_CUTOFFS = (5, 10, 20, 50, 100)


def recall_cutoffs(k: int) -> tuple[int, ...]:
    """The cut-offs that mean what they say for a top-k ranking: none larger than k."""
    return tuple(c for c in CUTOFFS if c <= k)


def metric_names(k: int = 100) -> list[str]:
    """`mrr`, then `recall@K` for each cut-off no larger than k, smallest first (the order tables show)."""
    return ["mrr", *[f"recall@{c}" for c in recall_cutoffs(k)]]


def csv_metric_groups(k: int = 100) -> tuple[list[str], list[str]]:
    """`metric_names` split as metrics.csv places them: the first contract's metrics, then those added since."""
    contract = ["mrr", *[f"recall@{c}" for c in CONTRACT_CUTOFFS if c <= k]]
    return contract, [m for m in metric_names(k) if m not in contract]


def per_query(ranks: np.ndarray, k: int = 100) -> np.ndarray:
    """(queries, metrics) values in `metric_names(k)` order whose column means are the metrics: 1/rank (0 when the
    truth is not in the top k), then hit@K for each cut-off."""
    ranks = np.asarray(ranks)
    within = (ranks > 0) & (ranks <= k)
    columns = [np.where(within, 1.0 / np.maximum(ranks, 1), 0.0)]
    columns += [(within & (ranks <= cut)).astype(np.float64) for cut in recall_cutoffs(k)]
    return np.stack(columns, axis=1)


def scores(ranks: np.ndarray, k: int = 100) -> dict[str, float]:
    """MRR@k and Recall@K as fractions over all queries (a query whose truth is absent counts as a miss), and n."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        raise ValueError("no queries to score")
    means = per_query(ranks, k).mean(axis=0)
    return {"n": int(len(ranks)), **{name: float(v) for name, v in zip(metric_names(k), means)}}


def metric_label(name: str, k: int) -> str:
    """A metric's column heading: `MRR@100`, `R@5`."""
    return f"MRR@{k}" if name == "mrr" else name.replace("recall", "R")
