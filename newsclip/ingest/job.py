"""The ingest run: read every part, write `articles/` and `images/` shards in the input contract, then
`ingest-rejects.parquet` (every row or image left out, with its reason) and `ingest-summary.json`."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pyarrow as pa

from newsclip.articles import ARTICLE_SCHEMA, IMAGE_SCHEMA
from newsclip.ingest.columns import read_part
from newsclip.ingest.config import IngestConfig
from newsclip.ingest.download import Fetched
from newsclip.ingest.images import Folders, ImageTask, image_folder, image_tasks, load_image
from newsclip.runtime.store import output_folder, staged_dir, write_table, write_text

REJECT_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.string()), ("source", pa.string()),
                           ("row", pa.int64()), ("reason", pa.string())])

IMAGE_SHARD_MAX_BYTES = 512 * 2**20  # a shard also ends here, whatever image_shard_rows says

# image id -> the task and why its image could not be loaded
Failures = dict[str, tuple[ImageTask, Fetched]]


def _read_parts(cfg: IngestConfig) -> tuple[pl.DataFrame, dict[str, dict], Folders]:
    """Every part's rows (one frame), its facts for the summary, and the image folders of the parts that have one."""
    frames, facts = [], {}
    folders: Folders = {}
    for part in cfg.parts:  # one part at a time, so the first bad file or folder is the one reported
        frame, facts[part.name] = read_part(part, cfg)
        frames.append(frame)
        if (found := image_folder(part, cfg)) is not None:
            folders[part.name] = found
    return pl.concat(frames, how="vertical_relaxed"), facts, folders


def _article_rejects(rows: pl.DataFrame, cfg: IngestConfig) -> tuple[pl.DataFrame, list[dict]]:
    """Rows with an article id, each id once (its first row wins); a reject record for every other row."""
    rejects = [{"kind": "article", "id": None, "source": r["source"], "row": r["row"], "reason": "missing article id"}
               for r in rows.filter(pl.col("article_id").is_null()).select("source", "row").iter_rows(named=True)]
    rows = rows.filter(pl.col("article_id").is_not_null())
    first = rows.select(pl.col("article_id").is_first_distinct()).to_series()
    hint = "" if cfg.id_prefix else " (set id_prefix: true when parts reuse ids)"
    rejects += [{"kind": "article", "id": r["article_id"], "source": r["source"], "row": r["row"],
                 "reason": "duplicate article id: the first row is kept" + hint}
                for r in rows.filter(~first).select("article_id", "source", "row").iter_rows(named=True)]
    return rows.filter(first), rejects


def _write_articles(articles: pl.DataFrame, stage: Path, shard_rows: int) -> int:
    table = articles.select([f.name for f in ARTICLE_SCHEMA]).to_arrow()
    table = table.cast(ARTICLE_SCHEMA, safe=False)  # `published` is already truncated to whole seconds
    shards = 0
    for start in range(0, max(table.num_rows, 1), shard_rows):  # an empty input still gets one (empty) shard
        write_table(table.slice(start, shard_rows), stage / f"part-{shards:05d}.parquet")
        shards += 1
    return shards


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _write_images(tasks: list[ImageTask], folders: Folders, cfg: IngestConfig, stage: Path) -> tuple[int, Failures]:
    """Load every image (folder, else URL) a window at a time, write shards; return (shards, failures by id)."""
    failures: Failures = {}
    buffer: list[tuple[str, bytes]] = []
    shards = 0

    def flush() -> None:
        nonlocal shards, buffer
        ids, blobs = zip(*buffer, strict=True) if buffer else ((), ())
        table = pa.table([pa.array(ids, pa.string()), pa.array(blobs, pa.binary())], schema=IMAGE_SCHEMA)
        write_table(table, stage / f"part-{shards:05d}.parquet")
        shards, buffer = shards + 1, []

    # A window of a few loads per thread bounds memory to ~one shard of images however large the release.
    window = max(4 * cfg.network.concurrency, 16)
    buffered_bytes = 0
    with ThreadPoolExecutor(cfg.network.concurrency, thread_name_prefix="ingest") as pool:
        for chunk in _chunks(tasks, window):
            for task, result in zip(chunk, pool.map(lambda t: load_image(t, folders, cfg), chunk), strict=True):
                if result.kind != "ok":
                    failures[task.image_id] = (task, result)
                    continue
                buffer.append((task.image_id, result.data))
                buffered_bytes += len(result.data)
                if len(buffer) >= cfg.image_shard_rows or buffered_bytes >= IMAGE_SHARD_MAX_BYTES:
                    flush()
                    buffered_bytes = 0
    if buffer or shards == 0:
        flush()
    return shards, failures


def _image_rejects(failures: Failures) -> list[dict]:
    """A reject record per image that could not be loaded, under the part and row that named it."""
    return [{"kind": "image", "id": image_id, "source": task.part.name, "row": task.row,
             "reason": f"{result.kind}: {result.reason}" + (f": {result.detail}" if result.detail else "")}
            for image_id, (task, result) in failures.items()]


def _add_part_counts(facts: dict[str, dict], articles: pl.DataFrame, tasks: list[ImageTask], rejects: list[dict],
                     failures: Failures, missing: list[str], unreadable: list[str]) -> None:
    """Add each part's article, reject and image counts to its facts (in place)."""
    for name, f in facts.items():
        mine = articles.filter(pl.col("source") == name)
        own = [t for t in tasks if t.part.name == name]
        f.update({
            "articles": mine.height,
            "rejected_rows": sum(1 for r in rejects if r["kind"] == "article" and r["source"] == name),
            "articles_without_image_id": int(mine["image_id"].is_null().sum()),
            "articles_image_missing": int(mine["image_id"].is_in(missing).sum()),
            "articles_image_unreadable": int(mine["image_id"].is_in(unreadable).sum()),
            "images": sum(1 for t in own if t.image_id not in failures),
            "images_missing": sum(1 for t in own if t.image_id in missing),
            "images_unreadable": sum(1 for t in own if t.image_id in unreadable),
        })


def ingest(cfg: IngestConfig) -> dict:
    """Write `articles/` and `images/` shards plus `ingest-summary.json` and `ingest-rejects.parquet`.

    Both folders are staged and replace the previous ones only when everything is written.
    """
    started = time.time()
    out = cfg.output
    rows, facts, folders = _read_parts(cfg)
    articles, rejects = _article_rejects(rows, cfg)
    tasks = image_tasks(articles, cfg, folders)

    output_folder(out, "output_dir")
    with staged_dir(out, "articles") as article_stage, staged_dir(out, "images") as image_stage:
        article_shards = _write_articles(articles, article_stage, cfg.article_shard_rows)
        image_shards, failures = _write_images(tasks, folders, cfg, image_stage)

    rejects += _image_rejects(failures)
    missing = [i for i, (_, r) in failures.items() if r.kind == "missing"]
    unreadable = [i for i, (_, r) in failures.items() if r.kind == "unreadable"]
    _add_part_counts(facts, articles, tasks, rejects, failures, missing, unreadable)
    reasons = Counter([r["reason"] for r in rejects if r["kind"] == "article"]
                      + [f"{r.kind}: {r.reason}" for _, r in failures.values()])
    summary = {
        "output_dir": str(out),
        "articles": articles.height,
        "article_shards": article_shards,
        "images": len(tasks) - len(failures),
        "image_shards": image_shards,
        "images_missing": len(missing),
        "images_unreadable": len(unreadable),
        "rejected_rows": sum(1 for r in rejects if r["kind"] == "article"),
        "reasons": dict(reasons.most_common()),
        "parts": facts,
        "seconds": round(time.time() - started, 2),
    }
    write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), out / "ingest-rejects.parquet")
    write_text(out / "ingest-summary.json", json.dumps(summary, indent=2))
    return summary
