"""Example articles on the page: each with its top-5 images as thumbnails, the correct one framed in green."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from newsclip.names import rankings_stem
from newsclip.report.data import load_images
from newsclip.report.escape import esc
from newsclip.retrieval.ranks import BATCH_ROWS, truth_ranks
from newsclip.runtime.layout import Layout
from newsclip.runtime.store import read_batches
from newsclip.workers.images import ImageDecodeError, decode_image

THUMB = 160  # thumbnail bounding box in pixels: five per row fit a 1000 px page
BODY_CHARS = 700  # article body shown per example; the rest is cut (the full text is in prepared/queries)
SHOWN = 5  # images shown per article: the top of its ranking


def _thumbnail_uri(data: bytes | None) -> str | None:
    """A JPEG data URI of the image scaled into THUMB x THUMB, or None when it cannot be decoded."""
    try:
        image = decode_image(data, alpha="white").convert("RGB")  # a thumbnail: as a viewer shows it
    except ImageDecodeError:
        return None
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pick_examples(ids: pa.Array, ranks: np.ndarray, count: int) -> list[int]:
    """A hit at rank 1, one ranked 2-5, one further down or missed, then the rest, in id order: deterministic.

    `ranks` are the truths' ranks of the queries `ids` (0: not in the ranking); returns positions in `ids`.
    Vectorised, as there may be millions of queries."""
    order = pc.sort_indices(ids).to_numpy()
    ranks = np.asarray(ranks)[order]
    free = np.ones(len(order), dtype=bool)  # in id order: not chosen yet
    chosen: list[int] = []
    for test in (ranks == 1, (ranks >= 2) & (ranks <= 5), (ranks == 0) | (ranks > 5)):
        pick = np.flatnonzero(test & free)[:1]
        if len(pick) and len(chosen) < count:
            chosen.append(int(pick[0]))
            free[pick] = False
    chosen += np.flatnonzero(free)[: max(0, count - len(chosen))].tolist()
    return order[chosen].tolist()


def _rows_of(path: Path, article_ids: list[str]) -> pl.DataFrame:
    """The rankings rows of a few articles, found a batch at a time (a filtered `pq.read_table` buffers whole row
    groups: ~4.5 GB for a file of 1M rankings at k=100, which knn writes as one)."""
    wanted = pa.array(article_ids, pa.string())
    batches = [batch.filter(pc.is_in(batch.column("article_id"), value_set=wanted))
               for batch in read_batches(path, BATCH_ROWS)]
    return pl.from_arrow(pa.Table.from_batches(batches, schema=pq.read_schema(path)))


def _thumb(image_id: str, data: bytes | None, caption: str, css: str) -> str:
    uri = _thumbnail_uri(data) if data else None
    picture = (f'<img src="{uri}" alt="{esc(image_id)}">' if uri else '<span class="missing">no image</span>')
    return f'<div class="{css}">{picture}<br>{esc(caption)}<br><span class="meta">{esc(image_id)}</span></div>'


def _article(row: dict, rank: int, english: str | None) -> list[str]:
    """The article's title, facts and (cut) body, and its English translation when it was not in English."""
    body = (row.get("body") or "").strip()
    if len(body) > BODY_CHARS:
        body = body[:BODY_CHARS].rstrip() + " …"
    status = f"correct image at rank {rank}" if rank else "correct image not in the top k"
    lang = f" · lang {esc(row['lang'])}" if row.get("lang") else ""
    parts = [f'<div class="example"><h3>{esc(row.get("title") or "(no title)")}</h3>'
             f'<div class="meta">article {esc(row["article_id"])} · source {esc(row.get("source"))}{lang} · '
             f'{esc(status)}</div><div class="body">{esc(body)}</div>']
    if english and row.get("lang") not in (None, "en"):
        parts.append(f'<div class="body"><b>English (translated):</b> {esc(english[:BODY_CHARS])}</div>')
    return parts


def _thumbs(row: dict, rank: int, data: dict[str, bytes]) -> list[str]:
    """The top images with their scores, the correct one marked; the correct one apart when it is not among them."""
    parts = ['<div class="thumbs">']
    for position, (image_id, score) in enumerate(zip(row["image_ids"][:SHOWN], row["scores"][:SHOWN]), start=1):
        if image_id is None:  # a slot an approximate index left unfilled
            continue
        hit = image_id == row["image_id"]
        caption = f"#{position} · {score:.3f}" + (" ✓ correct" if hit else "")
        parts.append(_thumb(image_id, data.get(image_id), caption, "thumb hit" if hit else "thumb"))
    if not 1 <= rank <= SHOWN:
        where = f"correct image: rank {rank}" if rank else "correct image: not ranked"
        parts.append(_thumb(row["image_id"], data.get(row["image_id"]), where, "thumb truth"))
    return parts


def examples_html(output_dir: Path, backbone: str, queries: pl.DataFrame, images_spec: str | None,
                  count: int = 5, translated: pl.DataFrame | None = None) -> str:
    """`count` articles ranked by `backbone` (see `_pick_examples`), each with its top images as thumbnails."""
    path = Layout(output_dir).rankings_parquet(rankings_stem(backbone, "text_to_image"))
    if not path.exists() or count <= 0:
        return "<p class=\"note\">No rankings to show.</p>"
    # the truths' ranks streamed from the file (the whole ranking counts), then only the chosen rows read whole
    ranks, ranked = truth_ranks(queries, path, k=None)
    if not ranked.any():
        return "<p class=\"note\">No ranked queries.</p>"
    ids = queries["article_id"].to_arrow().filter(pa.array(ranked))
    picked = _pick_examples(ids, ranks[ranked], count)
    chosen = ids.take(pa.array(picked, pa.int64())).to_pylist()
    truth_rank = dict(zip(chosen, ranks[ranked][picked].tolist()))
    shown = _rows_of(path, chosen)
    rows = {r["article_id"]: r for r in queries.filter(pl.col("article_id").is_in(chosen))
            .join(shown, on="article_id", how="inner").iter_rows(named=True)}
    wanted = {i for a in chosen for i in rows[a]["image_ids"][:SHOWN] if i is not None} | \
        {rows[a]["image_id"] for a in chosen}
    data = load_images(output_dir, wanted, images_spec)
    if translated is not None:
        translated = translated.filter(pl.col("article_id").is_in(chosen))  # not a dict of every query's text
    english = dict(zip(translated["article_id"], translated["query_text"])) if translated is not None else {}
    parts = []
    for article_id in chosen:
        parts += _article(rows[article_id], truth_rank[article_id], english.get(article_id))
        parts += _thumbs(rows[article_id], truth_rank[article_id], data)
        parts.append("</div></div>")
    return "\n".join(parts)
