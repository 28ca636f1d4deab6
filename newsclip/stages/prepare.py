"""Prepare stage: join articles to images, reject what cannot be matched or decoded, sample the evaluation set.

The articles' work runs over partitions spilled to disk (hash partitions by id, then id ranges, then input-position
ranges), as Ray tasks or, for at most `ray.inline_rows` articles, the same functions in this process: the driver
holds counts and file lists, and the images' rows."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip import articles as contract  # its shard_batches by module: tests stand in for the reader
from newsclip.articles import IMAGE_SCHEMA, SchemaError, article_hashes, has_text, join_text, sample_positions
from newsclip.config import JobConfig
from newsclip.runtime import partitions  # its sizes by module: tests make them small
from newsclip.runtime.console import progress
from newsclip.runtime.layout import Prepared
from newsclip.runtime.partitions import (
    Spill,
    batches,
    frames,
    gather,
    hash_partitions,
    quantile_bounds,
    range_partitions,
    run_parts,
)
from newsclip.runtime.ray_setup import ensure_ray
from newsclip.runtime.rejects import write_rejects
from newsclip.runtime.stage import Needs, Stage
from newsclip.runtime.store import (
    parquet_files,
    read_batches,
    record_stage,
    staged_dir,
    write_stream,
    write_table,
    write_tables,
)

__all__ = ["run"]  # the stage; everything else here is its own business

ARTICLE_ROWS = {"article_id": pl.String, "image_id": pl.String, "source": pl.String, "lang": pl.String,
                "article_hash": pl.String, "has_text": pl.Boolean, "pos": pl.Int64}
HASH_ROWS = {"article_id": pl.String, "article_hash": pl.String}  # prepared/articles_all.parquet
USABLE_ROWS = {c: t for c, t in ARTICLE_ROWS.items() if c != "has_text"}
QUERY_KEYS = {"row": pl.Int64, "article_id": pl.String, "source": pl.String, "article_hash": pl.String}
REJECT_ROWS = {"id": pl.String, "kind": pl.String, "reason": pl.String, "pos": pl.Int64}
# An article's place in the input: its shard's index in the sorted shard list, then its row there. Every partition
# keeps its rows in this order, and the outputs are written in it.
POS_BITS = 32
def _position(index: int) -> pl.Expr:
    return (pl.lit(index, pl.Int64) * (1 << POS_BITS) + pl.col("row")).alias("pos")


def _shard_rows(path: Path) -> int:
    with contract.shard_file(path) as shard:
        return shard.metadata.num_rows


def _read_shard(path: str, index: int, work: str, text_mode: str, parts: int) -> dict:
    """One articles shard without titles and bodies (ARTICLE_ROWS: `has_text` says whether `text_mode` finds any
    text, `pos` where the row is), so that memory grows with the rows and not with their text, hash-partitioned by
    id into `work/read/`, and its (id, hash) rows in order into `work/all/`; its rows and a sample of its ids."""
    work, rows, sample = Path(work), 0, []
    with Spill(work / "read", f"{index:06d}") as spill, Spill(work / "all", "rows") as hashes:
        for frame in contract.shard_batches(Path(path)):
            frame = frame.with_columns(article_hashes(frame), has_text(text_mode).alias("has_text"),
                                       _position(index)).select(*ARTICLE_ROWS)
            spill.add(frame, hash_partitions(frame["article_id"], parts))
            hashes.add(frame.select(*HASH_ROWS), np.full(len(frame), index))
            sample.append(frame["article_id"].gather_every(partitions.SAMPLE_EVERY))
            rows += len(frame)
    return {"rows": rows, "sample": pl.concat(sample).drop_nulls().to_list() if sample else []}


def _query_rows(path: Path, queries: pl.DataFrame, text_mode: str) -> Iterator[pa.Table]:
    """The rows of `queries` (QUERY_KEYS of this shard) with their titles, bodies and joined text, read again from
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


def _write_queries(path: str, index: int, work: str, text_mode: str, target: str) -> int:
    """One shard's part of prepared/queries: its sampled rows (keys from `work/query-keys/`) with their texts."""
    keys = gather(Path(work) / "query-keys", index, QUERY_KEYS)
    return write_tables(_query_rows(Path(path), keys, text_mode), Path(target))


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
    before = pl.read_parquet(previous, columns=[id_column, hash_column]) if previous.exists() else None
    return _changes(current, before, id_column, hash_column)


def _changes(current: pl.DataFrame, before: pl.DataFrame | None, id_column: str, hash_column: str) -> dict:
    """`changes` between rows and the last run's: of one hash partition of each, or of all."""
    current = current.unique(id_column, keep="first").select(id_column, hash_column)
    before = current.clear() if before is None else before.unique(id_column, keep="first")
    both = current.join(before, on=id_column, how="inner", suffix="_before")
    return {"seen": len(current), "new": len(current) - len(both),
            "changed": int((both[hash_column] != both[f"{hash_column}_before"]).sum()),
            "deleted": len(before) - len(both)}


# the official rankings TSV separates ids by tabs and queries by lines: an id holding either would shift or split a line
UNSAFE_ID = r"[\t\n\r]"
UNSAFE_REASON = "holds a tab or line break, which the rankings TSV cannot hold"


def _unsafe_id(column: str) -> pl.Expr:
    return pl.col(column).str.contains(UNSAFE_ID)


def _reject(frame: pl.DataFrame, id_column: str, kind: str, reason: str | pl.Expr, where: str = "pos") -> pl.DataFrame:
    reason = pl.lit(reason) if isinstance(reason, str) else reason
    return frame.select(pl.col(id_column).cast(pl.String).alias("id"), pl.lit(kind).alias("kind"),
                        reason.cast(pl.String).alias("reason"), pl.col(where))


def _distinct_ids(articles: pl.DataFrame) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """Articles with an id that the rankings can hold, the first row of each id; and the rejects of the others (in
    the order `select` reports them). Of one hash partition by id, or of all."""
    rejects = []
    # rows without an id first: polars counts nulls as one value, so the first would pass as distinct (and then
    # vanish with no reject) and the others would be called duplicates
    rejects.append(_reject(articles.filter(pl.col("article_id").is_null()), "article_id", "article", "no article_id"))
    articles = articles.filter(pl.col("article_id").is_not_null())
    rejects.append(_reject(articles.filter(_unsafe_id("article_id")), "article_id", "article",
                           f"article_id {UNSAFE_REASON}"))
    articles = articles.filter(~_unsafe_id("article_id"))
    dup_articles = articles.filter(~pl.col("article_id").is_first_distinct())
    rejects.append(_reject(dup_articles, "article_id", "article", "duplicate article_id (an earlier row was kept)"))
    return articles.filter(pl.col("article_id").is_first_distinct()), rejects


def select_images(images: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Usable images (no decode `error`, which they lose), the broken ones (image_id, error), and the rejects of all
    the others with a reason each (their `file`)."""
    rejects = [_reject(images.filter(pl.col("image_id").is_null()), "image_id", "image", "no image_id", "file")]
    images = images.filter(pl.col("image_id").is_not_null())
    rejects.append(_reject(images.filter(_unsafe_id("image_id")), "image_id", "image", f"image_id {UNSAFE_REASON}",
                           "file"))
    images = images.filter(~_unsafe_id("image_id"))
    dup_images = images.filter(~pl.col("image_id").is_first_distinct())
    rejects.append(_reject(dup_images, "image_id", "image", "duplicate image_id (an earlier row was kept)", "file"))
    images = images.filter(pl.col("image_id").is_first_distinct())
    broken = images.filter(pl.col("error").is_not_null())
    rejects.append(_reject(broken, "image_id", "image", pl.col("error"), "file"))
    return images.filter(pl.col("error").is_null()).drop("error"), broken.select("image_id", "error"), \
        pl.concat(rejects)


def _joined(articles: pl.DataFrame, image_ids: pl.Series, broken: pl.DataFrame,
            text_mode: str) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """Of distinct articles, those with text and an image among `image_ids` (USABLE_ROWS), and the rejects of the
    others: an article whose image cannot be decoded (`broken`) is rejected here, before sampling, so that it is
    never a query."""
    articles = articles.with_columns(pl.col("source").fill_null("unknown"))
    no_text = ~pl.col("has_text")
    no_image_id = pl.col("image_id").is_null() | (pl.col("image_id") == "")
    unsafe_image_id = ~no_image_id & _unsafe_id("image_id")
    known = pl.col("image_id").is_in(image_ids.implode())
    image_error = pl.col("image_id").replace_strict(broken["image_id"], broken["error"], default=None,
                                                    return_dtype=pl.String)
    bad_image = image_error.is_not_null()
    rejects = [
        _reject(articles.filter(no_text), "article_id", "article", f"no text ({text_mode} is empty)"),
        _reject(articles.filter(~no_text & no_image_id), "article_id", "article", "no image_id"),
        _reject(articles.filter(~no_text & unsafe_image_id), "article_id", "article", f"image_id {UNSAFE_REASON}"),
        _reject(articles.filter(~no_text & ~no_image_id & ~unsafe_image_id & ~known & ~bad_image),
                "article_id", "article", "image_id not found in input.images"),
        _reject(articles.filter(~no_text & ~no_image_id & bad_image), "article_id", "article",
                pl.format("image {} cannot be decoded: {}", pl.col("image_id"), image_error))]
    return articles.filter(~no_text & ~no_image_id & known).select(*USABLE_ROWS), rejects


# the article rejects of a partition, by their place in the rejects file: those of `_distinct_ids`, then (after the
# images') those of `_joined`
ID_REJECTS, JOIN_REJECTS = range(3), range(3, 8)


def _select_part(part: int, work: str, bounds: list[str], text_mode: str, image_ids: pl.Series,
                 broken: pl.DataFrame) -> dict:
    """One hash partition of the articles (by id): its changes since the last run, its rejects (into
    `work/rejected/<kind>/`) and its usable rows, range-partitioned by id into `work/usable/`."""
    work = Path(work)
    articles = gather(work / "read", part, ARTICLE_ROWS)
    before = gather(work / "before", part, HASH_ROWS) if (work / "before").exists() else None
    diff = _changes(articles, before, "article_id", "article_hash")
    distinct, rejects = _distinct_ids(articles)
    usable, joined = _joined(distinct, image_ids, broken, text_mode)
    with Spill(work / "rejected", f"{part:05d}") as spill:
        for kind, frame in enumerate(rejects + joined):
            spill.add(frame, np.full(len(frame), kind))
    with Spill(work / "usable", f"{part:05d}") as spill:
        spill.add(usable, range_partitions(usable["article_id"], pl.Series(bounds, dtype=pl.String)))
        usable_rows = spill.rows
    return {"changes": diff, "usable": usable_rows, "rejected": sum(len(f) for f in rejects + joined)}


def _sample_part(part: int, work: str, ranks: np.ndarray | None, out_bounds: np.ndarray, sample_images: bool) -> int:
    """One id range of the usable articles: `in_eval` for those at `ranks` in id order (all when None), then
    range-partitioned by input position into `work/out/` (and the sampled images' ids into `work/sampled/` when the
    sample's images are the candidates); its sampled rows."""
    work = Path(work)
    usable = gather(work / "usable", part, USABLE_ROWS).sort("article_id")
    in_eval = np.ones(len(usable), bool)
    if ranks is not None:
        in_eval[:] = False
        in_eval[ranks] = True
    usable = usable.with_columns(in_eval=pl.Series(in_eval))
    with Spill(work / "out", f"{part:05d}") as spill:
        spill.add(usable, np.searchsorted(out_bounds, usable["pos"].to_numpy(), side="right"))
    if sample_images:
        with Spill(work / "sampled", f"{part:05d}") as spill:
            ids = usable.filter("in_eval").select("image_id").unique()
            spill.add(ids, np.zeros(len(ids), np.int64))
    return int(in_eval.sum())


def _position_bounds(rows: list[int], per_range: int) -> np.ndarray:
    """Input positions that cut the articles of shards of `rows` rows each, in order, into ranges of `per_range`."""
    bounds, seen, cut = [], 0, per_range
    for index, count in enumerate(rows):
        while cut < seen + count:
            bounds.append((index << POS_BITS) + cut - seen)
            cut += per_range
        seen += count
    return np.array(bounds, np.int64)


def _spill_before(previous: Path, folder: Path, parts: int) -> None:
    """The last run's (id, hash) rows, hash-partitioned by id like this run's."""
    if not previous.exists():
        return
    with Spill(folder, "before") as spill:
        for batch in read_batches(previous, columns=list(HASH_ROWS)):
            frame = pl.from_arrow(batch).cast(HASH_ROWS)
            spill.add(frame, hash_partitions(frame["article_id"], parts))


def _with_file(frame: pl.DataFrame, files: pl.Series) -> pl.DataFrame:
    """The input shard of each row, from its position."""
    return frame.with_columns(file=files.gather(frame["pos"] // (1 << POS_BITS)))


def _run(cfg: JobConfig) -> dict:
    """Read, check and join the inputs; commit prepared/ and rejects/prepare.parquet; return the manifest entry."""
    work = cfg.layout.scratch("prepare")
    try:
        return _prepare(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare(cfg: JobConfig, work: Path) -> dict:
    out, layout = cfg.output, cfg.layout
    last = layout.prepared  # what the last run committed
    paths = parquet_files(cfg.input.articles, "input.articles")
    files = pl.Series("file", [str(p) for p in paths], pl.String)
    total = sum(_shard_rows(p) for p in paths)
    inline = total <= cfg.ray.inline_rows  # a small night: in this process, the same work on the same partitions
    parts = max(1, -(-total // partitions.PART_ROWS))
    read = run_parts(cfg, _read_shard, [(str(p), i, str(work), cfg.prepare.text, parts) for i, p in enumerate(paths)],
                     inline, "shards")
    shard_rows = [r["rows"] for r in read]
    articles_in = sum(shard_rows)
    sample = pl.Series([i for r in read for i in r["sample"]], dtype=pl.String)
    ranges = max(1, -(-articles_in // partitions.PART_ROWS))
    bounds = quantile_bounds(sample, ranges).to_list()
    del read, sample

    image_rows = _read_images(cfg, last.image_hashes)
    images, broken, image_rejects = select_images(image_rows.select("image_id", "image_hash", "error", "file"))
    _spill_before(last.articles_all, work / "before", parts)
    selected = run_parts(cfg, _select_part, [(p, str(work), bounds, cfg.prepare.text) for p in range(parts)],
                         inline, "partitions", image_ids=images["image_id"], broken=broken)
    diff = {"articles": {key: sum(s["changes"][key] for s in selected) for key in selected[0]["changes"]},
            "images": changes(last.image_hashes, image_rows, "image_id", "image_hash")}
    per_range = [sum(s["usable"].get(r, 0) for s in selected) for r in range(len(bounds) + 1)]
    usable_pairs = sum(per_range)

    positions = sample_positions(usable_pairs, cfg.eval.sample_size, cfg.eval.seed)
    starts = np.cumsum([0, *per_range])
    ranks = [None if positions is None else
             positions[(positions >= start) & (positions < end)] - start for start, end in zip(starts, starts[1:])]
    sampled_images = cfg.eval.candidates == "sample"
    out_bounds = _position_bounds(shard_rows, partitions.OUT_ROWS)
    queries = sum(run_parts(cfg, _sample_part, [(r, str(work), ranks[r], out_bounds, sampled_images)
                                                 for r in range(len(per_range))], inline, "id ranges"))
    if sampled_images:
        candidate = pl.col("image_id").is_in(gather(work / "sampled", 0, {"image_id": pl.String})["image_id"]
                                             .implode())
    else:
        candidate = pl.lit(True)
    images = images.with_columns(candidate.alias("candidate"))

    def rejected_rows() -> Iterator[pa.Table]:
        yield pl.DataFrame(schema={**dict.fromkeys(("id", "kind", "reason", "file"), pl.String)}).to_arrow()
        for kinds in (ID_REJECTS, None, JOIN_REJECTS):
            if kinds is None:
                yield image_rejects.to_arrow()
                continue
            for kind in kinds:
                rows = gather(work / "rejected", kind, REJECT_ROWS).sort("pos")
                yield _with_file(rows, files).drop("pos").to_arrow()

    rejected = write_rejects(out, "prepare", "prepare", rejected_rows())  # before any stop: they say why
    n_rejected = sum(s["rejected"] for s in selected) + len(image_rejects)
    if queries == 0:
        raise ValueError(f"prepare: no article has both text and a decodable image (of {articles_in} articles, "
                         f"{len(image_rows)} images); see why with `newsclip rejects` on this job, or in {rejected}")

    note = None
    if cfg.eval.sample_size is not None and usable_pairs < cfg.eval.sample_size:
        note = f"only {usable_pairs} usable pairs, fewer than eval.sample_size={cfg.eval.sample_size}: all were used"
    with staged_dir(out, layout.relative(layout.prepared.dir)) as folder:
        stage = Prepared(folder)  # the same names as the committed folder's
        with_queries = _write_articles(work, len(out_bounds) + 1, files, stage.articles)
        # one part per input shard with queries, in the input's order
        run_parts(cfg, _write_queries, [(str(paths[i]), i, str(work), cfg.prepare.text,
                                         str(stage.queries / f"part-{i:05d}.parquet")) for i in with_queries],
                  inline, "query parts")
        write_table(images.to_arrow(), stage.candidates)
        # what the next run compares against (and the image hashes and checks it need not compute again)
        empty = pl.DataFrame(schema=HASH_ROWS).to_arrow()  # the schema, when no shard has rows
        write_stream(itertools.chain([empty], *(batches(work / "all", i) for i in range(len(paths)))),
                     stage.articles_all)
        checks = image_rows.select(*IMAGE_ROWS).to_arrow()
        write_table(checks.replace_schema_metadata({CHECK_KEY: _check_settings(cfg.encode.max_image_pixels)}),
                    stage.image_hashes)
    facts = {"rejects": str(rejected.relative_to(out)),
             "articles_in": articles_in, "images_in": len(images) + len(image_rejects),
             "usable_pairs": usable_pairs, "queries": queries, "candidates": int(images["candidate"].sum()),
             "rejected": n_rejected, "sample_note": note,
             # images decoded by this run; the others kept a result (last run's, or that of the same bytes in this task)
             "images_checked": int(image_rows["checked"].sum()),
             "images_reused": int((~image_rows["checked"]).sum()),
             "images_broken": int(image_rows["error"].is_not_null().sum()),
             "changes": diff}
    return record_stage(out, "prepare", sorted(layout.prepared.dir.rglob("*.parquet")), **facts)


def _write_articles(work: Path, ranges: int, files: pl.Series, target: Path) -> list[int]:
    """prepared/articles.parquet from `work/out/`, one input position range at a time, in input order; the sampled
    rows' keys go to `work/query-keys/<shard>/`. The shards with sampled rows."""
    with_queries = set()

    def rows() -> Iterator[pa.Table]:
        with Spill(work / "query-keys", "keys") as keys:
            for frame in frames(work / "out", range(ranges), {**USABLE_ROWS, "in_eval": pl.Boolean}):
                frame = _with_file(frame.sort("pos"), files)
                yield frame.select("article_id", "image_id", "source", "lang", "in_eval", "file").to_arrow()
                sampled = frame.filter("in_eval")
                shard = (sampled["pos"] // (1 << POS_BITS)).to_numpy()
                keys.add(sampled.select((pl.col("pos") % (1 << POS_BITS)).alias("row"), "article_id", "source",
                                        "article_hash"), shard)
                with_queries.update(np.unique(shard).tolist())

    write_stream(rows(), target)
    return sorted(with_queries)


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
