"""CSV/TSV parts: which column holds which field (release layouts, aliases, `columns:`), read into the contract's
fields with dates parsed, ids prefixed and every row numbered."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from newsclip.ingest.config import IngestConfig, PartConfig
from newsclip.ingest.errors import IngestError

FIELDS = ("article_id", "image_id", "title", "text", "image_file", "image_url", "lang", "published")

# Column names per field, tried in order (case-insensitive) by the `auto` layout. From the releases:
# 2019-2021 (`aid, url, iid, hashvalue, title, text, imgFile`: `url` is the ARTICLE's address, `imgFile` the
# image's file name), 2023 and later (`article_id, article_url, article_title, image_id, image_url`).
# NewsImages 2022 (parts RT, RSS, TW) is distributed on request only; its column names could not be checked,
# so the 2022 layout assumes the 2021 names (`aid`, `iid`, `title`, `text`) with image files named after the
# image id in each part's folder and an optional `image_url` column. Any name can be set in `columns:`.
ALIASES: dict[str, tuple[str, ...]] = {
    "article_id": ("aid", "article_id", "articleid", "article id"),
    "image_id": ("iid", "image_id", "imageid", "image id", "img_id"),
    "title": ("title", "article_title", "headline"),
    "text": ("text", "article_text", "body", "snippet", "content", "lead"),
    "image_file": ("imgfile", "image_file", "img_file", "imagefile", "filename", "file"),
    "image_url": ("image_url", "imageurl", "img_url", "imgurl"),
    "lang": ("lang", "language"),
    "published": ("published", "published_at", "date", "pubdate", "timestamp"),
}
# A named layout requires its CORE columns; its other columns are used when the file has them.
LAYOUTS: dict[str, dict[str, str]] = {
    "newsimages2021": {"article_id": "aid", "image_id": "iid", "title": "title", "text": "text",
                       "image_file": "imgFile"},
    "newsimages2022": {"article_id": "aid", "image_id": "iid", "title": "title", "text": "text",
                       "image_url": "image_url"},
}
CORE = ("article_id", "image_id", "title", "text")
TSV_SUFFIXES = {".tsv", ".tab"}


def _separator(part: PartConfig) -> str:
    if part.separator is not None:
        return part.separator
    return "\t" if Path(part.file).suffix.lower() in TSV_SUFFIXES else ","


def resolve_columns(cfg: IngestConfig, header: list[str], where: str) -> dict[str, str | None]:
    """Field -> column name in this file, from `columns:` first, then the layout; errors name the column."""
    by_lower = {h.lower(): h for h in header}
    layout = LAYOUTS.get(cfg.layout, {})
    mapping: dict[str, str | None] = {}
    for name in FIELDS:
        explicit = getattr(cfg.columns, name)
        if explicit is not None:
            if explicit not in header:
                raise IngestError(f"{where}: columns.{name} is {explicit!r} but the file has no such column "
                                  f"(columns: {', '.join(header)})")
            mapping[name] = explicit
        elif cfg.layout == "auto":
            mapping[name] = next((by_lower[c] for c in ALIASES[name] if c in by_lower), None)
        else:
            wanted = layout.get(name)
            if wanted is not None and wanted not in header and name in CORE:
                raise IngestError(f"{where}: layout {cfg.layout} expects a column {wanted!r} for {name} "
                                  f"(columns: {', '.join(header)}); set columns.{name} to the right name")
            mapping[name] = wanted if wanted in header else None
    if mapping["article_id"] is None:
        raise IngestError(f"{where}: no article id column (tried {', '.join(ALIASES['article_id'])}; columns: "
                          f"{', '.join(header)}); set columns.article_id")
    return mapping


def _parse_published(column: pl.Series) -> tuple[pl.Series, int]:
    """Strings to naive UTC datetimes (seconds); the count of non-empty values that did not parse."""
    present = int(column.is_not_null().sum())
    parsed = None
    for attempt in (lambda s: s.str.to_datetime(strict=False, time_unit="ms"),
                    lambda s: s.str.to_date(strict=False).cast(pl.Datetime("ms"))):
        try:
            parsed = attempt(column)
            break
        except pl.exceptions.PolarsError:  # no format could be inferred from the values
            continue
    if parsed is None:
        return pl.Series(column.name, [None] * len(column), pl.Datetime("ms")), present
    if isinstance(parsed.dtype, pl.Datetime) and parsed.dtype.time_zone is not None:
        parsed = parsed.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return parsed.dt.truncate("1s"), present - int(parsed.is_not_null().sum())


def _read_table(path: Path, part: PartConfig, cfg: IngestConfig) -> pl.DataFrame:
    """The file as strings, header names stripped of blanks and a byte order mark; IngestError if unparsable."""
    try:
        frame = pl.read_csv(path, separator=_separator(part), has_header=True, infer_schema=False,
                            quote_char=cfg.quote_char, encoding=cfg.encoding)
    except pl.exceptions.PolarsError as e:
        raise IngestError(f"{path}: cannot parse as {'TSV' if _separator(part) == chr(9) else 'CSV'}: {e}") from None
    return frame.rename({c: c.strip().lstrip("\ufeff") for c in frame.columns})


def _field(name: str, mapping: dict[str, str | None]) -> pl.Expr:
    """The field's column with blanks stripped and empty strings as null; a null column when the file has none."""
    source = mapping[name]
    if source is None:
        return pl.lit(None, pl.String).alias(name)
    return pl.col(source).str.strip_chars().replace("", None).alias(name)


def read_part(part: PartConfig, cfg: IngestConfig) -> tuple[pl.DataFrame, dict]:
    """One part's rows as the contract's columns plus `image_file`, `image_url` and the data `row` number."""
    path = Path(part.file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"parts[{part.name}].file: {path} does not exist")
    frame = _read_table(path, part, cfg)
    mapping = resolve_columns(cfg, frame.columns, str(path))
    out = frame.select([_field(name, mapping) for name in FIELDS]).with_row_index("row", offset=1)
    facts = {"rows": out.height, "columns": {k: v for k, v in mapping.items() if v is not None}}
    published, unparsed = _parse_published(out["published"])
    facts["published_unparsed"] = unparsed
    lang = pl.col("lang").str.to_lowercase()
    out = out.with_columns(
        published.alias("published"),
        (lang if part.lang is None else pl.coalesce(lang, pl.lit(part.lang.lower()))).alias("lang"),
        pl.lit(part.name).alias("source"),
        pl.col("row").cast(pl.Int64),
        pl.col("image_id").alias("raw_image_id"),
    )
    if cfg.id_prefix:
        out = out.with_columns(*(pl.when(pl.col(c).is_not_null()).then(pl.lit(f"{part.name}:") + pl.col(c))
                                 .alias(c) for c in ("article_id", "image_id")))
    return out, facts
