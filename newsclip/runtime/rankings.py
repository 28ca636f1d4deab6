"""The rankings format, written in one place: `rankings/<stem>.parquet`, the official `rankings/<stem>.tsv`, and beside
an exact search's the database it was ranked against, committed together.

`<stem>.parquet` has one row per query, in query id order: the query id (`article_id` | `image_id`), the ranked
database ids best first (`image_ids` | `article_ids`; null where an approximate index left a slot unfilled), their
`scores` (float32; a fusion's are fused scores, not cosines) and `query_hash`, the content hash of the query's text
(or image), from which a nightly run tells an unchanged query (null where it is not known: fused rankings whose
members' files predate the column). A search's rankings carry in their metadata the sha256 of
`<stem>.database.parquet` (the database's (id, hash) rows), so that a nightly run merges only into rankings of that
database."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from newsclip.retrieval.search import PAD_KEY
from newsclip.runtime.console import warn
from newsclip.runtime.layout import Layout
from newsclip.runtime.store import atomic_path, file_sha256

# the last rankings carry the digest of the database they were ranked against, so a nightly run never merges
# into rankings from another database (a crash between the two files' commits)
DATABASE_DIGEST = b"newsclip.database_sha256"


def rankings_paths(out: Path, stem: str) -> tuple[Path, Path, Path]:
    """The rankings (`.parquet`), the official `.tsv` and the database ranked against (`.database.parquet`)."""
    layout = Layout(out)
    return layout.rankings_parquet(stem), layout.rankings_tsv(stem), layout.rankings_database(stem)


def rankings_schema(query_id: str, db_list: str, metadata: dict | None = None) -> pa.Schema:
    """The Parquet schema of rankings: query id, ranked db ids, scores (float32), query_hash."""
    return pa.schema([(query_id, pa.string()), (db_list, pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                      ("query_hash", pa.string())], metadata=metadata)


def last_rankings(out: Path, stem: str) -> tuple[Path, pa.Table] | None:
    """The committed rankings (their path) and the database they were ranked against, when both exist and the
    rankings say they were ranked against that database; else None (an older layout, a crash between the two
    files' commits, fused rankings)."""
    rankings, _, database = rankings_paths(out, stem)
    if not rankings.exists() or not database.exists():
        return None
    metadata = pq.read_schema(rankings).metadata or {}
    if metadata.get(DATABASE_DIGEST) != file_sha256(database).encode():
        return None
    return rankings, pq.read_table(database)


class RankingsWriter:
    """One rankings file pair (and the database ranked against, when given), written a batch of queries at a time
    in query id order, and committed when the `with` block ends without an error: the database first, the
    rankings last, so that a crash between leaves rankings whose digest is not the database's."""

    def __init__(self, out: Path, stem: str, query_id: str, db_list: str, database: pa.Table | None = None):
        self.query_id, self.db_list, self.database = query_id, db_list, database
        self.paths = list(rankings_paths(out, stem)[: 2 if database is None else 3])
        self._filled: list[np.ndarray] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RankingsWriter:
        with self._stack as stack:
            tmp = [stack.enter_context(atomic_path(p)) for p in self.paths]
            metadata = None
            if self.database is not None:
                pq.write_table(self.database, tmp[2])
                metadata = {DATABASE_DIGEST: file_sha256(tmp[2]).encode()}
            self.schema = rankings_schema(self.query_id, self.db_list, metadata)
            # no dictionary: ids are nearly all distinct per file, and the writer is 2x faster without
            self._parquet = stack.enter_context(pq.ParquetWriter(tmp[0], self.schema, use_dictionary=False))
            self._tsv = stack.enter_context(open(tmp[1], "w"))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def write(self, query_ids, lists: pa.ListArray | pa.ChunkedArray, scores: np.ndarray | pa.ListArray |
              pa.ChunkedArray, query_hashes) -> None:
        """Rankings rows: query ids, their ranked ids, scores (a (rows, k) matrix or lists) and query hashes (None:
        unknown), cast to the format's types."""
        if isinstance(scores, np.ndarray):
            scores = list_column(scores, pa.float32())
        if query_hashes is None:
            query_hashes = pa.nulls(len(lists), pa.string())
        table = pa.table([query_ids, lists, scores, query_hashes], names=self.schema.names)
        table = table.cast(self.schema.remove_metadata())
        self._parquet.write_table(table)
        self._tsv.write(tsv_lines(table.column(self.query_id), table.column(self.db_list)))
        self._filled.append(_filled(table.column(self.db_list)))

    def short_lines(self, k: int, pool: int, what: str) -> dict:
        """`short_lines` of every line written so far."""
        return short_lines(np.concatenate(self._filled) if self._filled else np.zeros(0, int), k, pool, what)


def _filled(lists: pa.ChunkedArray) -> np.ndarray:
    """The ids (non-null values) of each list."""
    lists = lists.combine_chunks()
    valid = pc.is_valid(pc.list_flatten(lists)).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy()
    return np.bincount(parents[valid], minlength=len(lists))


def ranked_lists(keys: np.ndarray, sorted_ids: pa.Array) -> pa.ListArray:
    """A (queries, k) matrix of keys (positions in `sorted_ids`, PAD_KEY for an empty slot) as lists of ids."""
    flat = keys.ravel()
    pad = flat == PAD_KEY
    ids = sorted_ids.take(pa.array(np.where(pad, 0, flat), mask=pad))
    offsets = pa.array(np.arange(0, flat.size + 1, max(keys.shape[1], 1), dtype=np.int32)[: len(keys) + 1])
    return pa.ListArray.from_arrays(offsets, ids)


def tsv_lines(query_ids, lists: pa.ListArray) -> str:
    """The official NewsImages format: article_id<TAB>image_id_1<TAB>...<TAB>image_id_k, one line per article.
    A slot an approximate index left unfilled (null) is left out, never written as text."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    if isinstance(query_ids, pa.ChunkedArray):
        query_ids = query_ids.combine_chunks()
    elif not isinstance(query_ids, pa.Array):
        query_ids = pa.array(query_ids, pa.string())
    joined = pc.binary_join(lists, "\t")  # null where a list holds a null
    lines = pc.binary_join_element_wise(query_ids, joined, "\t").to_pylist()
    odd = pc.or_(pc.is_null(joined), pc.equal(pc.list_value_length(lists), 0))
    for i in np.flatnonzero(odd.to_numpy(zero_copy_only=False)):
        lines[i] = "\t".join([str(query_ids[int(i)]), *(str(x) for x in lists[int(i)].as_py() if x is not None)])
    return "".join(line + "\n" for line in lines)


def list_column(rows, value_type) -> pa.ListArray:
    """One list per row: from a (rows, k) matrix without a Python list per row, or from a sequence of lists."""
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        offsets = pa.array(np.arange(0, rows.size + 1, max(rows.shape[1], 1), dtype=np.int32)[: len(rows) + 1])
        return pa.ListArray.from_arrays(offsets, pa.array(rows.ravel(), value_type))
    return pa.array([list(r) for r in rows], pa.list_(value_type))


def short_lines(filled: np.ndarray, k: int, pool: int, what: str) -> dict:
    """How many ranking lines hold fewer than k ids (`filled`: the ids of each line), and why, logged: the
    organisers' evaluator reads exactly k image ids per line."""
    short = int(np.count_nonzero(filled < k))
    if not short:
        return {"short_lines": 0}
    why = (f"there are only {pool} candidates, fewer than k={k}" if pool < k else
           f"the approximate index found fewer than k={k} candidates for these queries")
    warn(f"{what}: {short} of {len(filled)} ranking lines hold fewer than k={k} ids: {why}")
    return {"short_lines": short, "short_reason": why}
