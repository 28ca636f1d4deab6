"""Prepare stage: join articles to images, reject what cannot be matched or decoded, sample the evaluation set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip import articles as contract  # its shard_batches by module: tests stand in for the reader
from newsclip.articles import IMAGE_SCHEMA, SchemaError, article_hashes, has_text, join_text, sample_pairs
from newsclip.config import JobConfig
from newsclip.runtime.console import progress
from newsclip.runtime.layout import Prepared
from newsclip.runtime.ray_setup import ensure_ray
from newsclip.runtime.rejects import write_rejects
from newsclip.runtime.stage import Needs, Stage
from newsclip.runtime.store import parquet_files, record_stage, staged_dir, write_table, write_tables

__all__ = ["run"]  # the stage; everything else here is its own business

ARTICLE_ROWS = {"article_id": pl.String, "image_id": pl.String, "source": pl.String, "lang": pl.String,
                "article_hash": pl.String, "has_text": pl.Boolean, "file": pl.String, "row": pl.Int64}


def _read_articles(spec: str, text_mode: str) -> pl.DataFrame:
    """Every article row without its title and body, so that memory grows with the rows and not with their text:
    ARTICLE_ROWS, where `has_text` says whether `text_mode` finds any text and `file` and `row` where the row is."""
    frames = [frame.with_columns(article_hashes(frame), has_text(text_mode).alias("has_text"),
                                 pl.lit(str(path)).alias("file")).select(*ARTICLE_ROWS)
              for path in parquet_files(spec, "input.articles") for frame in contract.shard_batches(path)]
    return pl.concat(frames).rechunk() if frames else pl.DataFrame(schema=ARTICLE_ROWS)


def _query_rows(path: Path, queries: pl.DataFrame, text_mode: str) -> Iterator[pa.Table]:
    """The rows of `queries` (ARTICLE_ROWS of this shard) with their titles, bodies and joined text, read again from
    the shard a batch at a time, in the shard's order."""
    known = queries.select("row", pl.col("article_id").alias("known_id"), "source", "article_hash")
    found = 0
    for frame in contract.shard_batches(path):
        frame = frame.drop("source").filter(pl.col("row").is_in(known["row"].implode()))
        frame = frame.join(known, on="row", how="left")  # every row has its match: the shard's order is kept
        found += int((frame["article_id"] == frame["known_id"]).sum())
        yield frame.select("article_id", join_text(text_mode).alias("query_text"), "title",
                           pl.col("text").alias("body"), "lang", "image_id", "source", "article_hash").to_arrow()
    if found != len(known):
        raise ValueError(f"{path}: the shard changed while prepare read it: run the job again")


IMAGE_ROWS = {"image_id": pl.String, "image_hash": pl.String, "error": pl.String, "file": pl.String,
              "size": pl.Int64, "mtime_ns": pl.Int64}  # prepared/image_hashes.parquet
# image_hashes.parquet's metadata: the bound its `error` column was checked with
CHECK_KEY = b"newsclip.image_check"
# rows per check task at least (whole row groups): checking a 1200x800 JPEG took ~3.5 ms on one core, so a task
# works for seconds, far above Ray's per-task overhead
CHECK_ROWS = 2048


def _read_images(cfg: JobConfig, previous: Path) -> pl.DataFrame:
    """Per image row: its id, the shard it lives in, the hash of its bytes and why it cannot be decoded (null when it
    can); the bytes stay on disk for the encode stage. `checked` marks the rows decoded by this run.

    Ray tasks read, hash and check the shards. A shard unchanged since the last committed prepare (same path, size
    and mtime) is not read at all: its rows come from `previous`. In the others, an image whose hash `previous`
    holds keeps its result, so a nightly run decodes only images it has never seen."""
    cached = _cached_checks(previous, cfg.encode.max_image_pixels)
    shards, unchanged = {}, {}
    for path in parquet_files(cfg.input.images, "input.images"):
        stat = path.stat()
        shards[str(path)] = {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        hit = cached.filter(**shards[str(path)])
        if len(hit):
            unchanged[str(path)] = hit.with_columns(pl.lit(False).alias("checked"))
    read = _check_shards(cfg, [f for f in shards if f not in unchanged], cached)
    frames = [unchanged[f] if f in unchanged else
              pl.from_arrow(read[f]).with_columns(**{k: pl.lit(v) for k, v in fingerprint.items()})
              for f, fingerprint in shards.items()]
    return pl.concat([frame.select(*IMAGE_ROWS, "checked").cast(IMAGE_ROWS) for frame in frames])


def _cached_checks(previous: Path, max_pixels: int) -> pl.DataFrame:
    """The last committed prepare's image rows, if they were checked with the same bound; else none (a file from
    before the check, without `error`, or another encode.max_image_pixels: nothing is reused)."""
    metadata = (pq.read_schema(previous).metadata or {}) if previous.exists() else {}
    if metadata.get(CHECK_KEY) != _check_settings(max_pixels):
        return pl.DataFrame(schema=IMAGE_ROWS)
    return pl.read_parquet(previous).select(*IMAGE_ROWS).cast(IMAGE_ROWS)


def _check_settings(max_pixels: int) -> bytes:
    return json.dumps({"max_image_pixels": max_pixels}).encode()


def _row_group_units(path: Path) -> list[list[int]]:
    """A shard's row groups in runs of at least CHECK_ROWS rows, each the work of one check task."""
    with contract.shard_file(path) as shard:
        names = shard.schema_arrow.names
        missing = [c for c in IMAGE_SCHEMA.names if c not in names]
        if missing:
            raise SchemaError(f"{path}: no {missing[0]!r} column (has {', '.join(names)}); "
                              "images need image_id (string) and image (binary: the encoded file)")
        image_type = shard.schema_arrow.field("image").type
        if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
            raise SchemaError(f"{path}: column 'image' is {image_type}, expected binary (the encoded file)")
        sizes = [shard.metadata.row_group(group).num_rows for group in range(shard.num_row_groups)]
    units, unit, rows = [], [], 0
    for group, size in enumerate(sizes):
        unit.append(group)
        rows += size
        if rows >= CHECK_ROWS:
            units.append(unit)
            unit, rows = [], 0
    return units + [unit] if unit or not units else units


def _check_shards(cfg: JobConfig, files: list[str], cached: pl.DataFrame) -> dict[str, pa.Table]:
    """Each shard's (image_id, image_hash, error, checked) rows, from `check_images` run as Ray tasks over runs of
    its row groups (one task per shard unless it is large), or in this process for at most `ray.inline_rows` rows."""
    if not files:
        return {}
    from newsclip.workers.image_check import check_images

    units = [(file, groups) for file in files for groups in _row_group_units(Path(file))]
    known = cached.select("image_hash", "error").unique("image_hash", keep="first").to_arrow()
    known = known.cast(pa.schema([("image_hash", pa.string()), ("error", pa.string())]))
    parts = {file: [] for file in files}
    if sum(pq.read_metadata(f).num_rows for f in files) <= cfg.ray.inline_rows:  # a small night: in this process
        for file, groups in units:
            parts[file].append(check_images(file, groups, known, cfg.encode.max_image_pixels))
        return {file: pa.concat_tables(tables) for file, tables in parts.items()}
    import ray

    ensure_ray(cfg.ray)
    known = ray.put(known)  # once, for all tasks
    task = ray.remote(num_cpus=1, max_retries=cfg.ray.max_task_retries)(check_images)
    refs = [task.remote(file, groups, known, cfg.encode.max_image_pixels) for file, groups in units]
    pending = refs
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1)
        progress(len(refs) - len(pending), len(refs), unit="shard parts")
    for (file, _), table in zip(units, ray.get(refs)):
        parts[file].append(table)
    return {file: pa.concat_tables(tables) for file, tables in parts.items()}


def changes(previous: Path, current: pl.DataFrame, id_column: str, hash_column: str) -> dict:
    """Rows seen, new, changed and deleted since the last committed prepare (all new on a first run)."""
    current = current.unique(id_column, keep="first").select(id_column, hash_column)
    before = pl.read_parquet(previous, columns=[id_column, hash_column]).unique(id_column, keep="first") \
        if previous.exists() else current.clear()
    both = current.join(before, on=id_column, how="inner", suffix="_before")
    return {"seen": len(current), "new": len(current) - len(both),
            "changed": int((both[hash_column] != both[f"{hash_column}_before"]).sum()),
            "deleted": len(before) - len(both)}


# the official rankings TSV separates ids by tabs and queries by lines: an id holding either would shift or split a line
UNSAFE_ID = r"[\t\n\r]"


def _unsafe_id(column: str) -> pl.Expr:
    return pl.col(column).str.contains(UNSAFE_ID)


def _reject(frame: pl.DataFrame, id_column: str, kind: str, reason: str | pl.Expr) -> pl.DataFrame:
    reason = pl.lit(reason) if isinstance(reason, str) else reason
    return frame.select(pl.col(id_column).cast(pl.String).alias("id"), pl.lit(kind).alias("kind"),
                        reason.cast(pl.String).alias("reason"), pl.col("file"))


def select(articles: pl.DataFrame, images: pl.DataFrame, text_mode: str) -> tuple[pl.DataFrame, pl.DataFrame,
                                                                                   pl.DataFrame]:
    """Split input rows into usable articles, usable images, and rejects with a reason each.

    `images` holds each image row's decode `error` (null when it decodes): an image that cannot be decoded is
    rejected here, and so is every article whose image it is, before sampling, so that it is never a query."""
    rejects = []
    # rows without an id first: polars counts nulls as one value, so the first would pass as distinct (and then
    # vanish with no reject) and the others would be called duplicates
    rejects.append(_reject(articles.filter(pl.col("article_id").is_null()), "article_id", "article", "no article_id"))
    articles = articles.filter(pl.col("article_id").is_not_null())
    rejects.append(_reject(articles.filter(_unsafe_id("article_id")), "article_id", "article",
                           "article_id holds a tab or line break, which the rankings TSV cannot hold"))
    articles = articles.filter(~_unsafe_id("article_id"))
    dup_articles = articles.filter(~pl.col("article_id").is_first_distinct())
    rejects.append(_reject(dup_articles, "article_id", "article", "duplicate article_id (an earlier row was kept)"))
    articles = articles.filter(pl.col("article_id").is_first_distinct())

    rejects.append(_reject(images.filter(pl.col("image_id").is_null()), "image_id", "image", "no image_id"))
    images = images.filter(pl.col("image_id").is_not_null())
    rejects.append(_reject(images.filter(_unsafe_id("image_id")), "image_id", "image",
                           "image_id holds a tab or line break, which the rankings TSV cannot hold"))
    images = images.filter(~_unsafe_id("image_id"))
    dup_images = images.filter(~pl.col("image_id").is_first_distinct())
    rejects.append(_reject(dup_images, "image_id", "image", "duplicate image_id (an earlier row was kept)"))
    images = images.filter(pl.col("image_id").is_first_distinct())
    broken = images.filter(pl.col("error").is_not_null())
    rejects.append(_reject(broken, "image_id", "image", pl.col("error")))
    images = images.filter(pl.col("error").is_null()).drop("error")

    articles = articles.with_columns(pl.col("source").fill_null("unknown"))
    no_text = ~pl.col("has_text")
    no_image_id = pl.col("image_id").is_null() | (pl.col("image_id") == "")
    unsafe_image_id = ~no_image_id & _unsafe_id("image_id")
    known = pl.col("image_id").is_in(images["image_id"].implode())
    image_error = pl.col("image_id").replace_strict(broken["image_id"], broken["error"], default=None,
                                                    return_dtype=pl.String)
    bad_image = image_error.is_not_null()
    rejects.append(_reject(articles.filter(no_text), "article_id", "article", f"no text ({text_mode} is empty)"))
    rejects.append(_reject(articles.filter(~no_text & no_image_id), "article_id", "article", "no image_id"))
    rejects.append(_reject(articles.filter(~no_text & unsafe_image_id), "article_id", "article",
                           "image_id holds a tab or line break, which the rankings TSV cannot hold"))
    rejects.append(_reject(articles.filter(~no_text & ~no_image_id & ~unsafe_image_id & ~known & ~bad_image),
                           "article_id", "article", "image_id not found in input.images"))
    rejects.append(_reject(articles.filter(~no_text & ~no_image_id & bad_image), "article_id", "article",
                           pl.format("image {} cannot be decoded: {}", pl.col("image_id"), image_error)))
    usable = articles.filter(~no_text & ~no_image_id & known)
    return usable, images, pl.concat(rejects)


def _run(cfg: JobConfig) -> dict:
    """Read, check and join the inputs; commit prepared/ and rejects/prepare.parquet; return the manifest entry."""
    out, layout = cfg.output, cfg.layout
    last = layout.prepared  # what the last run committed
    articles = _read_articles(cfg.input.articles, cfg.prepare.text)
    image_rows = _read_images(cfg, last.image_hashes)
    diff = {"articles": changes(last.articles_all, articles, "article_id", "article_hash"),
            "images": changes(last.image_hashes, image_rows, "image_id", "image_hash")}
    usable, images, rejects = select(articles, image_rows.select("image_id", "image_hash", "error", "file"),
                                     cfg.prepare.text)
    sampled = sample_pairs(usable, cfg.eval.sample_size, cfg.eval.seed)
    usable = usable.with_columns(pl.col("article_id").is_in(sampled.implode()).alias("in_eval"))
    queries = usable.filter("in_eval")
    if cfg.eval.candidates == "sample":
        candidate = pl.col("image_id").is_in(queries["image_id"].implode())
    else:
        candidate = pl.lit(True)
    images = images.with_columns(candidate.alias("candidate"))
    rejected = write_rejects(out, "prepare", "prepare", rejects)  # before any stop: they say why
    if len(queries) == 0:
        raise ValueError(f"prepare: no article has both text and a decodable image (of {len(articles)} articles, "
                         f"{len(image_rows)} images); see why with `newsclip rejects` on this job, or in {rejected}")

    note = None
    if cfg.eval.sample_size is not None and len(usable) < cfg.eval.sample_size:
        note = f"only {len(usable)} usable pairs, fewer than eval.sample_size={cfg.eval.sample_size}: all were used"
    with staged_dir(out, layout.relative(layout.prepared.dir)) as folder:
        stage = Prepared(folder)  # the same names as the committed folder's
        write_table(usable.select("article_id", "image_id", "source", "lang", "in_eval", "file").to_arrow(),
                    stage.articles)
        # one part per input shard with queries, in the input's order
        by_file = queries.partition_by("file", as_dict=True)
        for index, path in enumerate(parquet_files(cfg.input.articles, "input.articles")):
            if (str(path),) in by_file:
                write_tables(_query_rows(path, by_file[str(path),], cfg.prepare.text),
                             stage.queries / f"part-{index:05d}.parquet")
        write_table(images.to_arrow(), stage.candidates)
        # what the next run compares against (and the image hashes and checks it need not compute again)
        write_table(articles.select("article_id", "article_hash").to_arrow(), stage.articles_all)
        checks = image_rows.select(*IMAGE_ROWS).to_arrow()
        write_table(checks.replace_schema_metadata({CHECK_KEY: _check_settings(cfg.encode.max_image_pixels)}),
                    stage.image_hashes)
    facts = {"rejects": str(rejected.relative_to(out)),
             "articles_in": len(articles), "images_in": len(images) + int((rejects["kind"] == "image").sum()),
             "usable_pairs": len(usable), "queries": len(queries), "candidates": int(images["candidate"].sum()),
             "rejected": len(rejects), "sample_note": note,
             # images decoded by this run; the others kept a result (last run's, or that of the same bytes in this task)
             "images_checked": int(image_rows["checked"].sum()),
             "images_reused": int((~image_rows["checked"]).sum()),
             "images_broken": int(image_rows["error"].is_not_null().sum()),
             "changes": diff}
    return record_stage(out, "prepare", sorted(layout.prepared.dir.rglob("*.parquet")), **facts)


def _input_shards(cfg: JobConfig) -> list[tuple[str, int, int]]:
    """The input shards as they are on disk now: a shard added, replaced or touched reruns the stage."""
    shards = parquet_files(cfg.input.articles, "input.articles") + parquet_files(cfg.input.images, "input.images")
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]


def _needs(cfg: JobConfig) -> Needs:
    """Input shards under both input keys."""
    missing = []
    for spec, key in ((cfg.input.articles, "input.articles"), (cfg.input.images, "input.images")):
        try:
            parquet_files(spec, key)
        except FileNotFoundError as e:
            missing.append(str(e))
    return Needs(tuple(missing))


# the sections it reads: another backbone list (`newsclip finetune`'s comparison, a backbone added) reuses its work
run = Stage("prepare", _run, external_inputs=_input_shards, sections=("input", "prepare", "eval", "encode"),
            needs=_needs)
