"""A fused backbone's rankings: its members' committed rankings (and embeddings) read, fused, and written in the
rankings format with a `knn:<slug>:<direction>` manifest entry."""

from __future__ import annotations

import polars as pl

from newsclip.names import DIRECTIONS, knn_entry, parse_fusion_name, rankings_stem, slug
from newsclip.retrieval.fusion import RRF_K, Embeddings, fuse
from newsclip.runtime.layout import Layout
from newsclip.runtime.rankings import RankingsWriter, rankings_paths
from newsclip.runtime.store import read_embeddings, record_stage


def fuse_rankings(cfg, name: str, direction: str = "text_to_image", rescore: bool = True, rrf_k: int = RRF_K) -> dict:
    """Fuse the members' committed rankings into `rankings/<slug(name)>` (+ `.tsv`) and a `knn:<slug>:<dir>` entry;
    `cfg` needs only `output` and `eval.k`.

    z-mean re-scores from `embeddings/<member>/` when `rescore` and the folders exist, else imputes (see
    `retrieval/fusion.py`). The fused queries are the members' queries, whose content hashes do not depend on the
    backbone: `query_hash` is the first member's that has one, null where none has (an older layout)."""
    out = cfg.output
    method, members = parse_fusion_name(name)
    query_side, query_col, db_side, db_col = DIRECTIONS[direction]
    list_col = f"{db_col}s"
    rankings = [pl.read_parquet(rankings_paths(out, rankings_stem(m, direction))[0]) for m in members]
    embeddings: list[Embeddings | None] = []
    for member in members:
        queries, database = (Layout(out).embeddings_of(slug(member), side) for side in (query_side, db_side))
        if method == "zmean" and rescore and queries.is_dir() and database.is_dir():
            q_ids, q_vec = read_embeddings(queries, query_col)
            c_ids, c_vec = read_embeddings(database, db_col)
            embeddings.append(Embeddings(q_ids, q_vec, c_ids, c_vec))
        else:
            embeddings.append(None)
    fused = fuse(rankings, method, cfg.eval.k, rrf_k=rrf_k, embeddings=embeddings, query_col=query_col,
                 list_col=list_col)
    hashes = [r.select(query_col, "query_hash").drop_nulls() for r in rankings if "query_hash" in r.columns]
    query_hash = (pl.concat(hashes).unique(query_col, keep="first", maintain_order=True) if hashes else
                  pl.DataFrame(schema={query_col: pl.String, "query_hash": pl.String}))
    fused = fused.join(query_hash, on=query_col, how="left", maintain_order="left")
    with RankingsWriter(out, rankings_stem(name, direction), query_col, list_col) as writer:
        table = fused.to_arrow()
        writer.write(table.column(query_col), table.column(list_col), table.column("scores"),
                     table.column("query_hash"))
    pool = pl.concat([r[list_col].explode() for r in rankings]).n_unique()
    return record_stage(out, knn_entry(name, direction), writer.paths, backbone=name, direction=direction,
                        members=members, method=method, rrf_k=rrf_k if method == "rrf" else None,
                        rescored=[e is not None for e in embeddings] if method == "zmean" else None,
                        queries=len(fused), k=cfg.eval.k, index="fusion", recall_at_k=None,
                        **writer.short_lines(cfg.eval.k, pool, f"knn {name} {direction}"))
