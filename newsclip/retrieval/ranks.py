"""Where each query's truth lands in its ranking, and the scores of one direction: MRR@k and Recall@K overall
and per source (`evaluate` scores every backbone with them; the report ranks its examples with `truth_ranks`).

A ranking is a frame or the path of a rankings Parquet file (knn's format: a query id column and a list of ranked
ids), read a batch at a time, so memory grows with the queries, not with queries x k."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from newsclip.names import DIRECTIONS
from newsclip.retrieval.metrics import scores
from newsclip.runtime.store import read_batches

BATCH_ROWS = 16_384  # rankings rows scored at a time: at k=100 about 1.6M ranked ids, ~100 MB of Arrow buffers


def query_images(queries: pl.DataFrame, direction: str) -> pl.DataFrame:
    """The queries of a direction, in the order `query_ranks` scores them, with the image each one is about:
    text_to_image, one per article (its true image); image_to_text, one per image (the first article's source)."""
    if direction == "text_to_image":
        return queries.select("article_id", "image_id", "source")
    return queries.group_by("image_id", maintain_order=True).agg(pl.col("source").first())


def query_ranks(queries: pl.DataFrame, rankings: pl.DataFrame | str | Path, k: int,
                direction: str = "text_to_image", ties: str = "id", image_hashes: pl.DataFrame | None = None,
                batch_size: int = BATCH_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Per-query 1-based ranks of the truth (0 = absent) and each query's source, in an order set by `queries` alone
    (so two backbones' arrays are aligned by query).

    text_to_image: each query article's truth is its image. image_to_text: each image that belongs to a query
    article is a query, and any article published with it is a hit. A query with no ranking is a miss.
    `ties` other than `id` re-ranks text_to_image truths among their byte-identical duplicates, found by
    `image_hashes` (image_id, image_hash of every candidate). `rankings` is a frame or the path of a rankings
    Parquet file, read `batch_size` rows at a time (see `truth_ranks`)."""
    ranks, _ = truth_ranks(queries, rankings, k, direction, ties, image_hashes, batch_size)
    return ranks, query_images(queries, direction)["source"].to_numpy()


def truth_ranks(queries: pl.DataFrame, rankings: pl.DataFrame | str | Path, k: int | None,
                direction: str = "text_to_image", ties: str = "id", image_hashes: pl.DataFrame | None = None,
                batch_size: int = BATCH_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """`query_ranks`' ranks (only positions up to `k` count; None: the whole ranking), and which queries have a
    ranking row, in `query_images` order.

    Vectorised over one record batch of rankings at a time, so memory grows with the queries (a few integers
    each) and one batch, never with queries x k Python objects: every ranked id gets a group code (its own id's,
    its image's for image_to_text, its image hash's under `ties`), and a hit is a ranked id whose code is its
    query's truth's. Query ids (and a direction's ranking rows) must be unique."""
    query_col, list_col = DIRECTIONS[direction][1], f"{DIRECTIONS[direction][3]}s"
    query_ids, truth, member_ids, member_codes, sizes = _truth_codes(queries, direction, ties, image_hashes)
    ranks, ranked = np.zeros(len(query_ids), dtype=np.int64), np.zeros(len(query_ids), dtype=bool)
    wanted = np.zeros(len(sizes), dtype=bool)
    for rows, lists in _ranking_batches(rankings, query_col, list_col, query_ids, batch_size):
        if ranked[rows[rows >= 0]].any() or len(np.unique(rows[rows >= 0])) != (rows >= 0).sum():
            raise ValueError(f"rankings list a {query_col} twice; expected one ranking per query")
        ranked[rows[rows >= 0]] = True
        batch_truth = np.append(truth, -1)[rows]  # a row of no query (-1): -1, the truth of nothing
        # the ids that can be a hit in this batch (a small set to look the ranked ids up in): those whose code
        # is one of its truths'
        wanted[batch_truth[batch_truth >= 0]] = True
        members = (member_codes >= 0) & np.append(wanted, False)[member_codes]
        wanted[:] = False
        first, last = _batch_ranks(lists, batch_truth, member_ids.filter(pa.array(members)), member_codes[members])
        if direction == "text_to_image" and ties not in ("id", "optimistic"):
            # pessimistic: the truth after every copy of it. Exact ties of one backbone sit side by side, so its
            # group ends `size - 1` below its first copy; a fusion (RRF ranks copies apart) may list a copy further
            # down, and the truth is then after that one
            first = np.where(first > 0, np.maximum(first + np.append(sizes, 1)[batch_truth] - 1, last), 0)
        found = np.where((first > 0) & (k is None or first <= k), first, 0)  # past the top k: a miss
        ranks[rows[rows >= 0]] = found[rows >= 0]
    return ranks, ranked


def _ranking_batches(rankings: pl.DataFrame | str | Path, query_col: str, list_col: str, query_ids: pa.Array,
                     batch_size: int) -> Iterator[tuple[np.ndarray, pa.Array]]:
    """(each row's query position, -1 for none; its ranked list) a batch of `batch_size` rankings rows at a time.

    Ranking rows of no query are left out, as a left join on the queries would; the query ids are read and looked
    up once, not per batch."""
    if isinstance(rankings, pl.DataFrame):
        row_query = _codes(_large(rankings[query_col].to_arrow()), query_ids)
        batches = rankings.select(list_col).to_arrow().to_batches(max_chunksize=batch_size)
        start = 0
        for batch in batches:
            yield row_query[start: start + batch.num_rows], batch.column(list_col)
            start += batch.num_rows
        return
    # buffered reads of a column chunk, not all of it at once: knn writes 1M rankings rows as one row group, whose
    # ranked ids pre-buffered whole take ~600 MB at k=100
    query = pa.concat_arrays([b.column(0) for b in read_batches(rankings, batch_size, [query_col])] or
                             [pa.array([], pa.string())])
    row_query = _codes(_large(query), query_ids)
    start = 0
    for batch in read_batches(rankings, batch_size, [list_col]):
        yield row_query[start: start + batch.num_rows], batch.column(list_col)
        start += batch.num_rows


def _large(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Ids as one large_string array (polars hands out string views, Parquet plain strings)."""
    ids = pc.cast(ids, pa.large_string())
    return ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids


def _filled(indices: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`index_in`'s answer as int64 with -1 where a value was not found."""
    return pc.fill_null(indices, -1).to_numpy().astype(np.int64) if len(indices) else np.zeros(0, np.int64)


def _codes(values: pa.Array, dictionary: pa.Array) -> np.ndarray:
    """Each value's (first) position in `dictionary`, -1 where it is absent or null."""
    return _filled(pc.index_in(values, value_set=dictionary, skip_nulls=True))


def _truth_codes(queries: pl.DataFrame, direction: str, ties: str, image_hashes: pl.DataFrame | None):
    """(query ids, each query's truth code, the ids that can be ranked, their codes, each code's group size).

    A ranked id is a hit when its code is its query's truth code: text_to_image codes an image id by itself, or
    with `ties` by its image hash (whose group of byte-identical copies has `sizes[code]` members);
    image_to_text codes an article by its image."""
    if direction == "text_to_image":
        query_ids, truth_ids = _large(queries["article_id"].to_arrow()), _large(queries["image_id"].to_arrow())
        if len(pc.unique(query_ids)) != len(query_ids):
            raise ValueError("query article_ids must be unique")
        if ties != "id":
            if image_hashes is None:
                raise ValueError(f"eval.ties={ties!r} needs the candidates' image hashes")
            hashes = pc.dictionary_encode(_large(image_hashes["image_hash"].to_arrow()))
            member_ids = _large(image_hashes["image_id"].to_arrow())
            member_codes = pc.fill_null(hashes.indices, -1).to_numpy().astype(np.int64)
            known = member_codes[member_codes >= 0]
            sizes = np.bincount(known, minlength=len(hashes.dictionary))
            truth = np.append(member_codes, -1)[_codes(truth_ids, member_ids)]  # not a candidate: -1
            return query_ids, truth, member_ids, member_codes, sizes
        images = pc.unique(truth_ids)
        return query_ids, _codes(truth_ids, images), images, np.arange(len(images)), np.ones(len(images), np.int64)
    articles, article_images = _large(queries["article_id"].to_arrow()), _large(queries["image_id"].to_arrow())
    images = pc.unique(article_images)  # the queries, in `query_images` order (first appearance)
    return images, np.arange(len(images)), articles, _codes(article_images, images), np.ones(len(images), np.int64)


def _batch_ranks(lists: pa.Array, truth: np.ndarray, member_ids: pa.Array,
                 member_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based positions of the first and the last ranked id in each list whose code is the row's `truth` code (0:
    none), over the whole list. Nulls (unfilled slots) hold a position and hit nothing."""
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy().astype(np.int64)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)
    position = np.arange(len(flat), dtype=np.int64) - (np.cumsum(lengths) - lengths)[parents] + 1
    found = _codes(flat, member_ids)
    code = np.append(member_codes, -2)[found]  # not a member (found -1): -2, no truth's code
    hit = code == truth[parents]
    # lists are flattened in row order, so a row's first hit is its smallest position and its last the largest
    rows, first = np.unique(parents[hit], return_index=True)
    firsts, lasts = np.zeros(len(lists), dtype=np.int64), np.zeros(len(lists), dtype=np.int64)
    firsts[rows] = position[hit][first]
    np.maximum.at(lasts, parents[hit], position[hit])
    return firsts, lasts


def score_rankings(queries: pl.DataFrame, rankings: pl.DataFrame | str | Path, k: int,
                   direction: str = "text_to_image") -> list[dict]:
    """Rows of metrics for one direction: source `all`, then one per source."""
    ranks, sources = query_ranks(queries, rankings, k, direction)
    rows = [{"source": "all", **scores(ranks, k)}]
    rows += [{"source": s, **scores(ranks[sources == s], k)} for s in sorted(set(sources))]
    return [{**row, "direction": direction} for row in rows]


def counts(queries: pl.DataFrame, direction: str, unusable: pl.Series | None = None) -> dict[str, int]:
    """Queries per source (and `all`) of a direction; with `unusable` image ids, only those whose image is one."""
    frame = query_images(queries, direction)
    if unusable is not None:
        frame = frame.filter(pl.col("image_id").is_in(unusable.implode()))
    return {"all": len(frame), **dict(frame["source"].value_counts().iter_rows())}


def duplicate_truths(queries: pl.DataFrame, image_hashes: pl.DataFrame) -> int:
    """Queries whose true image has a byte-identical copy under another id among the candidates: an exact tie."""
    sizes = image_hashes.group_by("image_hash").len("copies")
    truths = queries.join(image_hashes, on="image_id").join(sizes, on="image_hash")
    return int((truths["copies"] > 1).sum())
