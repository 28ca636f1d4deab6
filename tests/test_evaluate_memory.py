"""evaluate's ranks streamed from a rankings Parquet file a few rows at a time equal those of a frame in memory."""

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from newsclip.retrieval.ranks import query_ranks, truth_ranks

K = 3
# i2, i3, i8 are byte-identical (hash D), so are i4 and i5 (hash E)
HASHES = {"i1": "A", "i2": "D", "i3": "D", "i8": "D", "i4": "E", "i5": "E", "i6": "F", "i7": "G"}
QUERIES = pl.DataFrame({"article_id": ["a1", "a2", "a3", "a4", "a5", "a6"],
                        "image_id": ["i3", "i4", "i6", "i1", "i2", "i3"],
                        "source": ["TW", "RT", "TW", "RT", "TW", "RT"]})
# rows in no query order; None: an unfilled slot of an approximate index, or no ranked list at all; "zz"/"i9": ids
# of no query (left out); a5, a6 and image i2 have no ranking row
TEXT_TO_IMAGE = {"article_id": ["zz", "a3", "a1", "a4", "a2"],
                 "image_ids": [["i1"], ["i7", None, None, "i6"], ["i2", "i3", None], None, [None, "i5", "i4"]]}
IMAGE_TO_TEXT = {"image_id": ["i6", "i9", "i3", "i1", "i4"],
                 "article_ids": [None, ["a1"], ["a4", None, "a6"], ["a1", "a2", "a3", "a4"], [None, "a2"]]}
EXPECTED = {  # in query order: a1..a6, and images i3, i4, i6, i1, i2 (as first published)
    ("text_to_image", "id"): [2, 3, 0, 0, 0, 0],  # a3's truth is ranked 4th, past k
    ("text_to_image", "optimistic"): [1, 2, 0, 0, 0, 0],  # a1: its copy i2 is first
    ("text_to_image", "pessimistic"): [3, 3, 0, 0, 0, 0],  # a1: the last of three copies
    # image_to_text: a6 is published with i3 too; i1's article a4 is 4th, past k; ties apply to text_to_image only
    **{("image_to_text", ties): [3, 2, 0, 0, 0] for ties in ("id", "optimistic", "pessimistic")},
}


def _rankings(direction: str) -> pl.DataFrame:
    columns = TEXT_TO_IMAGE if direction == "text_to_image" else IMAGE_TO_TEXT
    query_col, list_col = columns
    scores = [None if ids is None else [1.0 - i / 10 for i in range(len(ids))] for ids in columns[list_col]]
    return pl.DataFrame({**columns, "scores": scores},
                        schema={query_col: pl.String, list_col: pl.List(pl.String), "scores": pl.List(pl.Float32)})


@pytest.mark.parametrize(("direction", "ties"), list(EXPECTED))
def test_streamed_ranks_equal_the_frame_ranks(tmp_path, direction, ties):
    hashes = pl.DataFrame({"image_id": list(HASHES), "image_hash": list(HASHES.values())})
    rankings = _rankings(direction)
    path = tmp_path / "rankings.parquet"
    pq.write_table(rankings.to_arrow(), path, row_group_size=3)  # batches of 2 cross row groups
    in_memory, sources = query_ranks(QUERIES, rankings, K, direction, ties, hashes)
    assert in_memory.tolist() == EXPECTED[direction, ties]
    for source in (path, str(path)):
        for batch_size in (1, 2, 1000):
            streamed, streamed_sources = query_ranks(QUERIES, source, K, direction, ties, hashes, batch_size)
            assert streamed.tolist() == in_memory.tolist(), (source, batch_size)
            assert streamed_sources.tolist() == sources.tolist()
    frame_batches, _ = query_ranks(QUERIES, rankings, K, direction, ties, hashes, batch_size=2)
    assert frame_batches.tolist() == in_memory.tolist()


def test_whole_ranking_and_which_queries_have_one(tmp_path):
    path = tmp_path / "rankings.parquet"
    pq.write_table(_rankings("text_to_image").to_arrow(), path)
    ranks, ranked = truth_ranks(QUERIES, path, k=None, batch_size=2)  # k=None: the whole ranking counts (examples)
    assert ranks.tolist() == [2, 3, 4, 0, 0, 0]
    assert ranked.tolist() == [True, True, True, True, False, False]  # a4's row has no list: ranked, a miss


def test_a_query_ranked_twice_is_an_error(tmp_path):
    rankings = pl.DataFrame({"article_id": ["a1", "a2", "a1"], "image_ids": [["i3"], ["i4"], ["i1"]]})
    path = tmp_path / "rankings.parquet"
    pq.write_table(rankings.to_arrow(), path)
    for source, batch_size in ((rankings, 1000), (path, 1), (path, 1000)):
        with pytest.raises(ValueError, match="twice"):
            query_ranks(QUERIES, source, K, batch_size=batch_size)
    with pytest.raises(ValueError, match="unique"):
        query_ranks(pl.concat([QUERIES, QUERIES.head(1)]), rankings.head(2), K)


def test_plain_string_lists_from_another_writer(tmp_path):
    # Parquet written by pyarrow directly: list<string>, not polars' large types
    table = pa.table({"article_id": pa.array(["a1", "a2"], pa.string()),
                      "image_ids": pa.array([["i3", "i1"], ["i1", "i4"]], pa.list_(pa.string()))})
    path = tmp_path / "rankings.parquet"
    pq.write_table(table, path)
    ranks, _ = query_ranks(QUERIES, path, K, batch_size=1)
    assert ranks.tolist() == [1, 2, 0, 0, 0, 0]
