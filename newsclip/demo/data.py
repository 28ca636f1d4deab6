"""`newsclip demo-data`: synthetic news articles and their images as Parquet shards in the input contract."""

from __future__ import annotations

import io
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.articles import ARTICLE_SCHEMA, IMAGE_SCHEMA
from newsclip.demo import news
from newsclip.demo.scenes import Scene, render

# The paper's sources per 2,000 articles; RT is the German part of NewsImages 2022.
SOURCE_SHARES = {"TW": 1512, "RSS": 134, "RT": 354}
SOURCE_LANG = {"TW": "en", "RSS": "en", "RT": "de"}
# Like the real data: ~3% of articles lack text or image, and some images belong to no article.
MISSING_TEXT, MISSING_IMAGE_ID, LOST_IMAGE = 0.01, 0.01, 0.01
ORPHAN_IMAGES = 0.05
PNG_SHARE = 0.1
IMAGE_SIZE = 64
SHARD_ROWS = 500


def _encode(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=90)
    else:
        image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def append_demo_data(out_dir: Path, articles: int, seed: int, shifted: bool = False) -> dict[str, int]:
    """A new day of the archive: `articles` new articles and their images as new shards beside the old ones."""
    first = sum(pq.read_metadata(p).num_rows for p in sorted((out_dir / "articles").glob("*.parquet")))
    return write_demo_data(out_dir, articles, seed, first_id=first, prefix=f"add-{first:07d}", shifted=shifted)


def _source_column(n: int, rng: np.random.Generator, shifted: bool) -> list[str]:
    # the shifted archive is an English newsroom's: the demo translator never saw its colour and place words
    shares = {s: v for s, v in SOURCE_SHARES.items() if not shifted or SOURCE_LANG[s] == "en"}
    total = sum(shares.values())
    counts = {s: round(n * share / total) for s, share in shares.items()}
    counts["TW"] += n - sum(counts.values())  # rounding remainder
    sources = [s for s, c in counts.items() for _ in range(c)]
    rng.shuffle(sources)
    return sources


def _write_shards(rows: list[dict], schema: pa.Schema, folder: Path, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(rows), SHARD_ROWS):
        path = folder / f"{prefix}-{start // SHARD_ROWS:05d}.parquet"
        table = pa.Table.from_pylist(rows[start:start + SHARD_ROWS], schema=schema)
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_demo_data(out_dir: Path, articles: int = 2000, seed: int = 0, first_id: int = 0,
                    prefix: str = "part", image_size: int = IMAGE_SIZE, shifted: bool = False) -> dict[str, int]:
    """Write `out_dir/articles/<prefix>-*.parquet` and `out_dir/images/<prefix>-*.parquet`; the same seed gives the
    same bytes. Article ids start at `first_id`, so a later batch of new articles (another seed) can join an archive.
    `image_size`: the side of the rendered scenes (larger than demo-tiny's 64 px: photo-sized files to decode).
    `shifted`: a domain demo-tiny never saw (`Scene.sample_shifted`: colours and backgrounds held out of its
    training), in English only: what the fine-tuning demo adapts demo-tiny to."""
    if articles < 1:
        raise ValueError(f"--articles must be at least 1, got {articles}")
    # a stream of its own, disjoint from demo-tiny's training data (and, for an appended day, from earlier days')
    rng = np.random.default_rng([seed, 2022] if first_id == 0 else [seed, 2022, first_id])
    sources = _source_column(articles, rng, shifted)
    draw = Scene.sample_shifted if shifted else Scene.sample
    start = datetime(2022, 1, 1)
    article_rows, image_rows = [], []
    for i, source in enumerate(sources):
        scene = draw(rng)
        image_id = f"img-{rng.bytes(6).hex()}"
        image = render(scene, rng, image_size)
        fmt = "PNG" if rng.random() < PNG_SHARE else "JPEG"
        lang = SOURCE_LANG[source]
        texts = news.article(scene, rng)
        which = 0 if lang == "en" else 1
        title, text = texts["title"][which], texts["text"][which]
        fault = rng.random()  # one draw picks at most one defect
        if fault < MISSING_TEXT:
            title, text = None, None
        elif fault < MISSING_TEXT + MISSING_IMAGE_ID:
            image_id = None
        image_lost = MISSING_TEXT + MISSING_IMAGE_ID <= fault < MISSING_TEXT + MISSING_IMAGE_ID + LOST_IMAGE
        if image_id and not image_lost:
            image_rows.append({"image_id": image_id, "image": _encode(image, fmt)})
        article_rows.append({
            "article_id": f"art-{first_id + i:06d}", "title": title, "text": text, "image_id": image_id,
            "source": source,
            "lang": lang, "published": start + timedelta(minutes=int(rng.integers(0, 365 * 24 * 60))),
        })
    for _ in range(round(articles * ORPHAN_IMAGES)):
        image = render(draw(rng), rng, image_size)
        image_rows.append({"image_id": f"img-{rng.bytes(6).hex()}", "image": _encode(image, "JPEG")})
    order = rng.permutation(len(image_rows))  # images are not stored in article order
    image_rows = [image_rows[j] for j in order]

    _write_shards(article_rows, ARTICLE_SCHEMA, out_dir / "articles", prefix)
    _write_shards(image_rows, IMAGE_SCHEMA, out_dir / "images", prefix)
    return {"articles": len(article_rows), "images": len(image_rows)}
