"""Fusion of backbones: one ranking from several backbones' rankings (mean of z-scores, or reciprocal rank fusion).

A fused backbone is named `fusion:A+B` (mean of z-normalised cosine similarities) or `fusion-rrf:A+B` (reciprocal rank
fusion), e.g. `fusion:RN50x64+ViT-L/14`; its files are `rankings/<slug(name)>.{parquet,tsv}` like any backbone's
(`backbones.slug` maps the name to `fusion-rn50x64-vit-l-14`), so evaluate and report score it under its own name.

Candidates: each query's candidates are the union of its members' top-k lists (as in any rank fusion, a candidate
outside every member's top-k is not considered: it would need to be in no member's top k and still win on average).

z-mean: every member scores every union candidate, z-normalised per (query, member) over the union (mean and
population std), and the fused score is the mean of the members' z-scores. A candidate missing from one member's
top-k needs that member's score: by default it is re-scored exactly from the stored embeddings
(`embeddings/<slug>/{texts,images}`: one float32 matrix product per block of queries against their union candidates,
the whole z-mean fusion of 2,000 queries x 2 backbones (768/1024-d) x k=100 took ~2 s on 2 busy CPU cores), and
all union pairs are re-scored the same way so every score comes from one computation. Without embeddings
(`embeddings=None`, or an id the member did not encode) the member's k-th (lowest top-k) score for that query is
imputed: an upper bound on the true score, so it slightly favours candidates the member did not rank.
The output `scores` are the fused scores, not cosines.

RRF: score = sum over members of 1 / (rrf_k + rank), a member that did not rank the candidate adding 0; rrf_k = 60
as in Cormack, Clarke & Buettcher (SIGIR 2009). Ties in either method break by candidate id, ascending.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

RRF_K = 60
# queries re-scored per matrix product: 256 x (their union candidates, <= 256 x members x k) float32 stays <= ~50 MB
_RESCORE_QUERIES = 256


@dataclass(frozen=True)
class Embeddings:
    """One member's L2-normalised vectors: query side and candidate side, each beside its ids."""

    query_ids: np.ndarray
    query_vectors: np.ndarray
    candidate_ids: np.ndarray
    candidate_vectors: np.ndarray


@dataclass
class _Union:
    """Every member's top-k lists on one grid: a row per (query, candidate) of the union, a column per member.

    Ids become dense integer codes in sorted id order, so sorting by code is sorting by id (the tie-break)."""

    query_ids: np.ndarray  # unique query ids, sorted
    candidate_ids: np.ndarray  # unique candidate ids, sorted
    query: np.ndarray  # (rows,) query code of each union row; rows sorted by (query, candidate)
    candidate: np.ndarray  # (rows,) candidate code
    starts: np.ndarray  # first row of each query's segment
    segment: np.ndarray  # (rows,) segment (= index into starts) of each row
    score: np.ndarray  # (rows, members) the member's top-k score, NaN where it did not rank the candidate
    rank: np.ndarray  # (rows, members) 1-based rank in the member's list, 0 where absent
    ranked_query: np.ndarray  # (queries, members) bool: the member has a ranking for the query


def _codes(values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes in sorted order and the sorted unique values."""
    codes = values.rank("dense").to_numpy().astype(np.int64) - 1
    return codes, values.unique().sort().to_numpy()


def _union(rankings: Sequence[pl.DataFrame], query_col: str, list_col: str) -> _Union:
    longs = []
    for member, frame in enumerate(rankings):
        long = (frame.select(pl.col(query_col).cast(pl.String).alias("query"),
                             pl.col(list_col).alias("candidate"), pl.col("scores").alias("score"))
                .with_columns(pl.int_ranges(1, pl.col("candidate").list.len() + 1).alias("rank"))
                .explode("candidate", "score", "rank").drop_nulls("candidate"))
        longs.append(long.with_columns(pl.col("candidate").cast(pl.String), pl.col("score").cast(pl.Float64),
                                       pl.col("rank").cast(pl.Int64), pl.lit(member, pl.Int64).alias("member")))
    long = pl.concat(longs)
    if len(long) == 0:
        raise ValueError("nothing to fuse: the rankings are empty")
    q_codes, query_ids = _codes(long["query"])
    c_codes, candidate_ids = _codes(long["candidate"])
    members = long["member"].to_numpy()
    keys = q_codes * len(candidate_ids) + c_codes
    unique_keys, row = np.unique(keys, return_inverse=True)
    query, candidate = unique_keys // len(candidate_ids), unique_keys % len(candidate_ids)
    score = np.full((len(unique_keys), len(rankings)), np.nan)
    rank = np.zeros((len(unique_keys), len(rankings)), dtype=np.int64)
    # a candidate listed twice by one member (it should not be) keeps its best position
    order = np.argsort(-long["rank"].to_numpy(), kind="stable")
    score[row[order], members[order]] = long["score"].to_numpy()[order]
    rank[row[order], members[order]] = long["rank"].to_numpy()[order]
    ranked_query = np.zeros((len(query_ids), len(rankings)), dtype=bool)
    ranked_query[q_codes, members] = True
    starts = np.flatnonzero(np.r_[True, query[1:] != query[:-1]])
    segment = np.cumsum(np.r_[False, query[1:] != query[:-1]])
    return _Union(query_ids, candidate_ids, query, candidate, starts, segment, score, rank, ranked_query)


def _top_k(u: _Union, fused: np.ndarray, k: int, query_col: str, list_col: str) -> pl.DataFrame:
    """Rankings format: per query the k best union candidates, fused score desc, ties by candidate id asc."""
    order = np.lexsort((u.candidate, -fused, u.query))  # rows stay grouped by query (query codes are sorted)
    position = np.arange(len(order)) - u.starts[u.segment]  # u.segment is the same for order as for rows
    keep = order[position < k]
    counts = np.minimum(np.diff(np.r_[u.starts, len(u.query)]), k)
    offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(u.candidate_ids[u.candidate[keep]], pa.string()))
    values = pa.ListArray.from_arrays(offsets, pa.array(fused[keep].astype(np.float32)))
    table = pa.table({query_col: pa.array(u.query_ids[u.query[u.starts]], pa.string()), list_col: ids,
                      "scores": values})
    return pl.from_arrow(table)


def _rows_of(wanted: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each wanted id in `ids` (its first, if encoded twice), -1 where it has none."""
    index = pl.DataFrame({"id": pl.Series(ids, dtype=pl.String)}).with_row_index("row").unique(
        "id", keep="first", maintain_order=True)
    found = pl.DataFrame({"id": pl.Series(wanted, dtype=pl.String)}).join(index, on="id", how="left",
                                                                          maintain_order="left")
    return found["row"].fill_null(-1).to_numpy().astype(np.int64)


def exact_scores(queries: np.ndarray, candidates: np.ndarray, emb: Embeddings) -> np.ndarray:
    """Cosine (inner product of normalised vectors) of each (query id, candidate id) pair; NaN where an id has no
    vector. Float32 products as FAISS computes them (ties closer than ~1e-7 may order differently than FAISS's)."""
    return _rescore_rows(_rows_of(np.asarray(queries), emb.query_ids),
                         _rows_of(np.asarray(candidates), emb.candidate_ids), emb)


def _rescore_rows(q_rows: np.ndarray, c_rows: np.ndarray, emb: Embeddings) -> np.ndarray:
    out = np.full(len(q_rows), np.nan)
    where = np.flatnonzero((q_rows >= 0) & (c_rows >= 0))
    where = where[np.argsort(q_rows[where], kind="stable")]
    q_sorted = q_rows[where]
    bounds = np.flatnonzero(np.r_[True, q_sorted[1:] != q_sorted[:-1]])  # first pair of each distinct query
    for block in range(0, len(bounds), _RESCORE_QUERIES):
        lo = bounds[block]
        hi = bounds[block + _RESCORE_QUERIES] if block + _RESCORE_QUERIES < len(bounds) else len(where)
        pairs = where[lo:hi]
        uq, qi = np.unique(q_rows[pairs], return_inverse=True)
        uc, ci = np.unique(c_rows[pairs], return_inverse=True)
        # one BLAS product per block of queries against the candidates they need, then pick the pairs
        products = emb.query_vectors[uq] @ emb.candidate_vectors[uc].T
        out[pairs] = products[qi, ci]
    return out


def rrf(rankings: Sequence[pl.DataFrame], k: int = 100, rrf_k: int = RRF_K, query_col: str = "article_id",
        list_col: str = "image_ids") -> pl.DataFrame:
    """Reciprocal rank fusion of rankings tables (same format in and out): sum of 1 / (rrf_k + rank) per candidate."""
    if rrf_k < 0:
        raise ValueError(f"rrf_k must be >= 0; got {rrf_k}")
    u = _union(rankings, query_col, list_col)
    fused = np.where(u.rank > 0, 1.0 / (rrf_k + np.maximum(u.rank, 1)), 0.0).sum(axis=1)
    return _top_k(u, fused, k, query_col, list_col)


def zmean(rankings: Sequence[pl.DataFrame], k: int = 100, embeddings: Sequence[Embeddings | None] | None = None,
          query_col: str = "article_id", list_col: str = "image_ids") -> pl.DataFrame:
    """Mean over members of per-query z-normalised cosine similarities over the union of their top-k candidates.

    `embeddings[m]` (or None) lets member m re-score every union pair exactly; otherwise (or for an id it has no
    vector for) a candidate outside its top-k gets its k-th score for that query."""
    if embeddings is not None and len(embeddings) != len(rankings):
        raise ValueError(f"{len(rankings)} rankings but {len(embeddings)} embeddings entries")
    u = _union(rankings, query_col, list_col)
    score = u.score.copy()
    for m in range(score.shape[1]):
        has = u.ranked_query[u.query, m]  # rows of queries this member ranked; the others stay NaN
        emb = embeddings[m] if embeddings is not None else None
        if emb is not None:
            rows = np.flatnonzero(has)
            # ids are looked up once per distinct id, then indexed by code
            q_rows, c_rows = _rows_of(u.query_ids, emb.query_ids), _rows_of(u.candidate_ids, emb.candidate_ids)
            exact = _rescore_rows(q_rows[u.query[rows]], c_rows[u.candidate[rows]], emb)
            score[rows, m] = np.where(np.isnan(exact), score[rows, m], exact)
        # the member's k-th (lowest) top-k score per query: what a candidate it did not rank is given
        floor = np.full(len(u.query_ids), np.inf)
        listed = ~np.isnan(u.score[:, m])
        np.minimum.at(floor, u.query[listed], u.score[listed, m])
        fill = has & np.isnan(score[:, m])
        score[fill, m] = floor[u.query[fill]]
    counts = np.diff(np.r_[u.starts, len(u.query)])[:, None]
    mean = np.add.reduceat(score, u.starts, axis=0) / counts
    deviation = score - mean[u.segment]
    std = np.sqrt(np.add.reduceat(deviation ** 2, u.starts, axis=0) / counts)[u.segment]
    # a member whose union scores are all equal says nothing about the order: z = 0 (NaN stays: member absent)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(std > 0, deviation / std, np.where(np.isnan(std), np.nan, 0.0))
    fused = np.nanmean(z, axis=1)  # every union row has at least one member that ranked its query
    return _top_k(u, fused, k, query_col, list_col)


def fuse(rankings: Sequence[pl.DataFrame], method: str = "zmean", k: int = 100, *, rrf_k: int = RRF_K,
         embeddings: Sequence[Embeddings | None] | None = None, query_col: str = "article_id",
         list_col: str = "image_ids") -> pl.DataFrame:
    """Fuse rankings tables by `method` (`zmean` or `rrf`)."""
    if method == "rrf":
        return rrf(rankings, k, rrf_k, query_col, list_col)
    if method == "zmean":
        return zmean(rankings, k, embeddings, query_col, list_col)
    raise ValueError(f"fusion method must be 'zmean' or 'rrf'; got {method!r}")
