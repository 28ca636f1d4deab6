"""The nightly merge: a query's last top-k merged with the database rows added since, instead of a full search, with
the same result bit for bit."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from newsclip.retrieval import search


class IdPositions:
    """Positions of ids in the sorted database ids, found by their 64-bit hashes, sorted once: Arrow's `index_in`
    builds a hash table of the whole database for every batch of queries, which at 1M ids took longer than the
    rest of a nightly's merge."""

    def __init__(self, sorted_ids: pa.Array):
        self.sorted_ids = sorted_ids
        hashes = pl.Series(sorted_ids).hash(seed=0).to_numpy()
        self._order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._order]

    def of(self, ids: pa.Array) -> np.ndarray:
        """The position of each of `ids`, every one of which must be in the database."""
        hashes = pl.Series(ids).hash(seed=0).to_numpy()
        by_hash = np.argsort(hashes)  # a search in sorted order stays in the CPU's caches
        at = np.empty(len(ids), np.int64)
        found = np.minimum(np.searchsorted(self._hashes, hashes[by_hash]), len(self._hashes) - 1)
        at[by_hash] = self._order[found]
        if len(ids) and not pc.all(pc.equal(self.sorted_ids.take(pa.array(at)), ids)).as_py():  # hashes collide
            at = pc.index_in(ids, value_set=self.sorted_ids).to_numpy(zero_copy_only=False).astype(np.int64)
        return at


def added_rows(last_database: pa.Table, database: pa.Table) -> np.ndarray:
    """Which rows of `database` (id, hash) are new or changed since `last_database`: the rows to search a merged
    query against (a mask over `database`)."""
    return pc.is_in(database.column("id"), value_set=_changed(database, last_database)).to_numpy(zero_copy_only=False)


class NightlyMerge:
    """This run's top-k of each query that has a last ranking to build on: its text (or image) unchanged and none of
    its last top-k rows deleted or changed. Such a query is searched against the added rows only (`added`, an index
    of the `added_rows`; None when there are none) and the rows that score at least its last k-th (all of them when
    it had fewer than k) are merged with its last top-k, ordered by score desc, then id asc, exactly as a full
    search orders them (both re-score exactly).

    `last_rankings`: the last rankings' batches (query id, ranked ids, scores, query_hash) in query id order, read
    forward beside this run's queries (a merge join); `sorted_ids`: this database's ids sorted, whose positions are
    the keys given back."""

    def __init__(self, last_rankings: Iterator[pa.RecordBatch], last_database: pa.Table, database: pa.Table,
                 sorted_ids: pa.Array, added: search.Index | None, k: int, query_id: str, db_list: str):
        self._last = _ForwardReader(last_rankings, query_id)
        self._gone = _changed(last_database, database)
        self._positions = IdPositions(sorted_ids)
        self._added = added
        self._added_keys = None if added is None else self._positions.of(pa.array(added.sorted_ids, pa.string()))
        self.k, self.query_id, self.db_list = k, query_id, db_list

    def merge(self, query_ids: pa.Array, query_hashes: pa.Array, vectors: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For a batch of this run's queries (ids in order, after those of every earlier batch; content hashes;
        vectors): which have a last ranking to build on (a mask), and their top-k now as (keys, scores)."""
        mine = self._last.upto(query_ids[-1].as_py())
        merged, last = self._intact(mine, query_ids, query_hashes)
        if not merged.any():
            return merged, np.empty((0, self.k), np.int64), np.empty((0, self.k), np.float32)
        keys, scores = self._merged(last, vectors[merged])
        return merged, keys, scores

    def _intact(self, last: pa.Table, query_ids: pa.Array, query_hashes: pa.Array) -> tuple[np.ndarray, pa.Table]:
        """Which queries have a last ranking to build on (the same content, none of its top-k gone), and those
        rankings, in the queries' order."""
        if not len(last):
            return np.zeros(len(query_ids), bool), last
        at = pc.index_in(query_ids, value_set=last.column(self.query_id).combine_chunks())
        lists = last.column(self.db_list).combine_chunks()
        usable = np.ones(len(last), bool)
        gone = pc.is_in(pc.list_flatten(lists), value_set=self._gone)
        usable[pc.list_parent_indices(lists).filter(gone).to_numpy()] = False
        same = pc.equal(query_hashes, last.column("query_hash").combine_chunks().take(at))
        rows = pc.fill_null(at, 0).to_numpy()
        merged = pc.fill_null(same, False).to_numpy(zero_copy_only=False) & usable[rows]
        return merged, last.take(pa.array(rows[merged]))

    def _merged(self, last: pa.Table, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each query's last top-k merged with the added rows that score at least its last k-th, as (keys, scores)."""
        lists = last.column(self.db_list).combine_chunks()
        keys = [self._positions.of(pc.list_flatten(lists)).reshape(len(lists), -1)]
        scores = [_matrix(last.column("scores"), np.float32)]
        if self._added is not None:
            floors = scores[0][:, -1] if scores[0].shape[1] >= self.k else np.full(len(lists), -np.inf, np.float32)
            more, more_scores = self._added.above(vectors, floors)
            added_keys = self._added_keys
            keys.append(np.where(more == search.PAD_KEY, search.PAD_KEY,
                                 added_keys[np.minimum(more, len(added_keys) - 1)]))
            scores.append(more_scores)
        merged_scores, merged_keys = search.merge_topk(scores, keys, self.k)
        return merged_keys, merged_scores


class _ForwardReader:
    """Record batches sorted by a query id, read forward beside another sorted stream (a merge join)."""

    def __init__(self, batches: Iterator[pa.RecordBatch], id_column: str):
        self._batches = batches
        self._id = id_column
        self._held: pa.Table | None = None
        self._done = False

    def upto(self, last_id: str) -> pa.Table:
        """The rows whose query id is at most `last_id` not returned before."""
        while not self._done and (self._held is None or not len(self._held)
                                  or self._held.column(self._id)[-1].as_py() <= last_id):
            try:
                batch = pa.Table.from_batches([next(self._batches)])
            except StopIteration:
                self._done = True
                break
            self._held = batch if self._held is None else pa.concat_tables([self._held, batch])
        if self._held is None:
            return pa.table({})
        n = pc.sum(pc.less_equal(self._held.column(self._id), last_id)).as_py() or 0
        rows, self._held = self._held.slice(0, n), self._held.slice(n)
        return rows


def _changed(table: pa.Table, other: pa.Table) -> pa.Array:
    """Ids of `table` whose (id, hash) is not in `other`: its new or changed rows (or, the other way, the deleted)."""
    key = pc.binary_join_element_wise(table.column("id"), table.column("hash"), "\x00")
    other_key = pc.binary_join_element_wise(other.column("id"), other.column("hash"), "\x00").combine_chunks()
    return table.column("id").filter(pc.invert(pc.is_in(key, value_set=other_key))).combine_chunks()


def _matrix(column: pa.ChunkedArray | pa.ListArray, dtype) -> np.ndarray:
    """A list column whose lists all have one length as a (rows, length) matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype).reshape(len(column), -1)
