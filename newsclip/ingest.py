"""`newsclip ingest`: NewsImages CSV/TSV files plus image folders (or image URLs) into the input contract's shards."""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import polars as pl
import pyarrow as pa

from newsclip.config import ConfigError, build, read_yaml
from newsclip.runtime.store import staged_dir, write_table, write_text

# The input contract (DESIGN.md); tests keep these equal to the demo data's schemas.
ARTICLE_SCHEMA = pa.schema([
    ("article_id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("image_id", pa.string()),
    ("source", pa.string()), ("lang", pa.string()), ("published", pa.timestamp("s")),
])
IMAGE_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary())])
REJECT_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.string()), ("source", pa.string()),
                           ("row", pa.int64()), ("reason", pa.string())])

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
FETCH_CHUNK = 1 << 16
IMAGE_SHARD_MAX_BYTES = 512 * 2**20  # a shard also ends here, whatever image_shard_rows says


class IngestError(ValueError):
    """Input files that cannot be ingested at all (a missing required column, an unparsable CSV)."""


# ----------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PartConfig:
    """One CSV/TSV file of the release; its name becomes the articles' `source` (RT, RSS, TW...)."""

    name: str
    file: str
    images: str | None = None  # folder of the part's image files (None: only URLs, or no images)
    lang: str | None = None  # ISO 639-1 of the whole part when the file has no language column (RT: de)
    separator: str | None = None  # None: tab for .tsv/.tab files, comma otherwise

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name: must not be empty")
        if self.separator is not None and len(self.separator) != 1:
            raise ValueError(f"separator: must be one character, got {self.separator!r}")


@dataclass(frozen=True)
class ColumnsConfig:
    """Column names in the files; None: the layout's default for that field."""

    article_id: str | None = None
    image_id: str | None = None
    title: str | None = None
    text: str | None = None
    image_file: str | None = None  # the image's file name inside the part's image folder
    image_url: str | None = None  # fetched only when network.enabled
    lang: str | None = None
    published: str | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """Fetching images from their URLs; off by default, so ingest never touches the network unless asked."""

    enabled: bool = False
    timeout_s: float = 10.0  # per attempt, for the whole response
    retries: int = 2  # further attempts after a timeout, a connection error, HTTP 408/429 or 5xx
    backoff_s: float = 0.5  # doubled after each failed attempt
    concurrency: int = 8  # parallel downloads
    user_agent: str = "newsclip-ingest/0.1"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("timeout_s: must be positive")
        if self.concurrency < 1:
            raise ValueError("concurrency: must be at least 1")


@dataclass(frozen=True)
class IngestConfig:
    """An ingest job: parts (CSV/TSV + image folder) in, `output_dir/{articles,images}/` out."""

    parts: tuple[PartConfig, ...]
    output_dir: str = "data/newsimages"
    layout: Literal["auto", "newsimages2021", "newsimages2022"] = "auto"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    id_prefix: bool = False  # article and image ids become "<part>:<id>" (parts whose id spaces overlap)
    article_shard_rows: int = 50_000
    image_shard_rows: int = 1_000  # ~100 KB per news image: ~100 MB shards
    max_image_bytes: int = 20_000_000  # larger files and downloads are refused (unreadable: too large)
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
    include_unreferenced_images: bool = False  # also ingest folder images no row names (test sets list them apart)
    quote_char: str | None = '"'  # null: no quoting (TSV files whose texts contain stray quotes)
    encoding: Literal["utf8", "utf8-lossy"] = "utf8-lossy"  # lossy: invalid bytes become U+FFFD
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self) -> None:
        for key in ("article_shard_rows", "image_shard_rows", "max_image_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1")
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"parts: part names must be unique, got {names}")
        if self.quote_char is not None and len(self.quote_char) != 1:
            raise ValueError(f"quote_char: must be one character or null, got {self.quote_char!r}")
        object.__setattr__(self, "image_extensions",
                           tuple(e.lower().lstrip(".") for e in self.image_extensions))

    @property
    def output(self) -> Path:
        return Path(self.output_dir).expanduser()


def from_dict(raw: dict) -> IngestConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of keys at the top level, got {raw!r}")
    if not raw.get("parts"):
        raise ConfigError("parts: expected a non-empty list of {name, file, images} entries, one per CSV/TSV file")
    return build(IngestConfig, raw)


def load(path: str | Path, overrides: list[str] = ()) -> IngestConfig:
    """Load an ingest config (YAML, safe_load) and apply `key=value` overrides; errors name the key."""
    raw = read_yaml(path, overrides, "ingest config")
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------- file-name safety
class UnsafePath(ValueError):
    """A file name from a CSV that would leave its image folder."""


def safe_path(folder: Path, name: str) -> Path:
    """`folder/name` for a name read from an untrusted CSV, resolved; UnsafePath if it could leave `folder`.

    Refuses absolute paths (POSIX or Windows), `..` components, NUL bytes, and names that resolve through a
    symlink to somewhere outside the folder. Subfolders inside the folder are fine.
    """
    if not name or "\x00" in name:
        raise UnsafePath("empty file name or NUL byte")
    posix = name.replace("\\", "/")  # a Windows-made CSV: "..\\x" must not slip past the ".." check
    if PurePosixPath(posix).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        raise UnsafePath(f"absolute path {name!r}")
    if ".." in PurePosixPath(posix).parts:
        raise UnsafePath(f"path {name!r} contains '..'")
    root = folder.resolve()
    resolved = (root / posix).resolve()
    if not resolved.is_relative_to(root):
        raise UnsafePath(f"{name!r} resolves outside the image folder (symlink)")
    return resolved


def read_capped(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; OSError/ValueError otherwise."""
    # O_NOFOLLOW: the path is already resolved, so a symlink here was swapped in after the check
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"too large: {info.st_size} bytes > max_image_bytes {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"too large: more than max_image_bytes {max_bytes}")
    return data


# -------------------------------------------------------------------------------------------------- network
class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (the default handler would also follow ftp://)."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http URL {newurl!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass
class Fetched:
    """An image's bytes, or why there are none: `reason` is a short category (counted), `detail` says more."""

    data: bytes | None
    kind: Literal["ok", "missing", "unreadable"]
    reason: str = ""
    detail: str = ""


def fetch(url: str, net: NetworkConfig, max_bytes: int) -> Fetched:
    """GET one image with a total timeout per attempt, a size cap, and retries on transient failures."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return Fetched(None, "unreadable", "unsupported URL scheme", url)
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    last = ""
    for attempt in range(net.retries + 1):
        if attempt:
            time.sleep(net.backoff_s * 2 ** (attempt - 1))
        deadline = time.monotonic() + net.timeout_s
        try:
            request = urllib.request.Request(url, headers={"User-Agent": net.user_agent})
            with opener.open(request, timeout=net.timeout_s) as response:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    return Fetched(None, "unreadable", "too large",
                                   f"Content-Length {length} > max_image_bytes {max_bytes}: {url}")
                chunks, size = [], 0
                while chunk := response.read(FETCH_CHUNK):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > max_bytes:
                        return Fetched(None, "unreadable", "too large", f"more than max_image_bytes {max_bytes}: {url}")
                    if time.monotonic() > deadline:  # a server that trickles bytes never trips the socket timeout
                        raise TimeoutError(f"response not complete after {net.timeout_s}s")
                return Fetched(b"".join(chunks), "ok")
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code in (404, 410):
                return Fetched(None, "missing", last, url)
            if not (e.code in (408, 429) or e.code >= 500):
                return Fetched(None, "unreadable", last, f"{e.msg}: {url}")
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, refused/reset connections
            reason = getattr(e, "reason", e)
            last = "timeout" if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError) else \
                f"{type(reason).__name__}: {reason}"
    return Fetched(None, "unreadable", f"download failed ({last.split(':')[0]})",
                   f"{net.retries + 1} attempts, last: {last}: {url}")


def image_problem(data: bytes) -> str | None:
    """None when the bytes start like an image Pillow reads (header only, nothing decoded), else the problem."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sizes between Pillow's two bomb bounds: the encode stage decides
            with Image.open(io.BytesIO(data)) as image:
                image.size  # noqa: B018 - parsed from the header
        return None
    except Image.DecompressionBombError as e:
        return f"too many pixels ({e})"
    except Exception:  # noqa: BLE001 - any failure to identify means "not an image"
        return "not an image"


# -------------------------------------------------------------------------------------------------- reading
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


def read_part(part: PartConfig, cfg: IngestConfig) -> tuple[pl.DataFrame, dict]:
    """One part's rows as the contract's columns plus `image_file`, `image_url` and the data `row` number."""
    path = Path(part.file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"parts[{part.name}].file: {path} does not exist")
    try:
        frame = pl.read_csv(path, separator=_separator(part), has_header=True, infer_schema=False,
                            quote_char=cfg.quote_char, encoding=cfg.encoding)
    except pl.exceptions.PolarsError as e:
        raise IngestError(f"{path}: cannot parse as {'TSV' if _separator(part) == chr(9) else 'CSV'}: {e}") from None
    frame = frame.rename({c: c.strip().lstrip("\ufeff") for c in frame.columns})
    mapping = resolve_columns(cfg, frame.columns, str(path))

    def column(name: str) -> pl.Expr:
        source = mapping[name]
        if source is None:
            return pl.lit(None, pl.String).alias(name)
        return pl.col(source).str.strip_chars().replace("", None).alias(name)

    out = frame.select([column(name) for name in FIELDS]).with_row_index("row", offset=1)
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


# ---------------------------------------------------------------------------------------------------- images
@dataclass
class ImageTask:
    image_id: str
    part: PartConfig
    raw_id: str | None  # the id as in the files (before id_prefix): what an image file is named after
    file: str | None = None  # the `image_file` value, when the layout has one
    url: str | None = None
    row: int | None = None


def _folder_index(folder: Path, extensions: tuple[str, ...]) -> dict[str, str]:
    """File stem -> file name for the image files directly in `folder` (first extension in config order wins)."""
    rank = {ext: i for i, ext in enumerate(extensions)}
    best: dict[str, tuple[int, str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or not stem or ext.lower() not in rank or entry.name.startswith("."):
                continue
            if stem not in best or rank[ext.lower()] < best[stem][0]:
                best[stem] = (rank[ext.lower()], entry.name)
    return {stem: name for stem, (_, name) in best.items()}


def _load_local(task: ImageTask, folder: Path, index: dict[str, str], cfg: IngestConfig) -> Fetched | None:
    """The task's image from its part's folder (its file name, else `<image id>.<ext>`); None when absent."""
    names = [task.file] if task.file is not None else []
    if task.raw_id in index:
        names.append(index[task.raw_id])
    for name in names:
        try:
            path = safe_path(folder, name)
            if not path.exists():
                continue
            return Fetched(read_capped(path, cfg.max_image_bytes), "ok")
        except UnsafePath as e:
            return Fetched(None, "unreadable", "unsafe file name", str(e))
        except (OSError, ValueError) as e:
            reason = "too large" if str(e).startswith("too large") else "cannot read file"
            return Fetched(None, "unreadable", reason, f"{name}: {e}")
    return None


def _load(task: ImageTask, folders: dict[str, tuple[Path, dict[str, str]]], cfg: IngestConfig) -> Fetched:
    result = None
    if task.part.name in folders:
        folder, index = folders[task.part.name]
        result = _load_local(task, folder, index, cfg)
    if result is None:
        if task.url and cfg.network.enabled:
            result = fetch(task.url, cfg.network, cfg.max_image_bytes)
        elif task.url:
            return Fetched(None, "missing", "not in the image folder (network disabled)", task.url)
        else:
            reason = "no image folder or URL" if task.part.name not in folders else "not in the image folder"
            return Fetched(None, "missing", reason, task.file or task.raw_id or "")
    problem = image_problem(result.data) if result.kind == "ok" else None
    if problem is not None:
        return Fetched(None, "unreadable", problem.split(" (")[0], f"{task.file or task.url or task.raw_id}: {problem}")
    return result


def _image_tasks(articles: pl.DataFrame, cfg: IngestConfig, folders: dict) -> list[ImageTask]:
    """One task per distinct image id (its first row wins), plus unreferenced folder images when asked."""
    tasks: dict[str, ImageTask] = {}
    elsewhere: dict[str, list[ImageTask]] = {}  # the same id in another part (possible without id_prefix)
    parts = {p.name: p for p in cfg.parts}

    def add(task: ImageTask) -> None:
        first = tasks.setdefault(task.image_id, task)
        if first.part.name != task.part.name:
            elsewhere.setdefault(task.image_id, []).append(task)

    for row in articles.filter(pl.col("image_id").is_not_null()).select(
            "image_id", "raw_image_id", "source", "image_file", "image_url", "row").iter_rows(named=True):
        add(ImageTask(row["image_id"], parts[row["source"]], row["raw_image_id"], row["image_file"],
                      row["image_url"], row["row"]))
    if cfg.include_unreferenced_images:
        referenced_files = {(t.part.name, t.file) for t in tasks.values() if t.file}
        for part in cfg.parts:
            if part.name not in folders:
                continue
            for stem, name in sorted(folders[part.name][1].items()):
                if (part.name, name) not in referenced_files:
                    add(ImageTask(f"{part.name}:{stem}" if cfg.id_prefix else stem, part, stem))
    _check_reused_ids(tasks, elsewhere, folders, cfg)
    return list(tasks.values())


def _check_reused_ids(tasks: dict[str, ImageTask], elsewhere: dict[str, list[ImageTask]], folders: dict,
                      cfg: IngestConfig) -> None:
    """An image id that two parts use must name the same bytes in both; otherwise every article would silently
    get the first part's image, so stop and say which id and parts."""
    for image_id, others in elsewhere.items():
        first = tasks[image_id]
        data = _load(first, folders, cfg).data
        for other in others:
            if _load(other, folders, cfg).data != data:
                raise IngestError(
                    f"image id {image_id!r} names different images in parts {first.part.name!r} and "
                    f"{other.part.name!r}: set id_prefix: true (ids become '<part>:<id>'), or give them distinct ids")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ------------------------------------------------------------------------------------------------------- run
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


def _write_images(tasks: list[ImageTask], folders: dict, cfg: IngestConfig, stage: Path) -> tuple[int, dict]:
    """Load every image (folder, else URL) a window at a time, write shards; return (shards, failures by id)."""
    failures: dict[str, tuple[ImageTask, Fetched]] = {}
    buffer: list[tuple[str, bytes]] = []
    shards = 0

    def flush() -> None:
        nonlocal shards, buffer
        ids, blobs = zip(*buffer, strict=True) if buffer else ((), ())
        table = pa.table({"image_id": pa.array(ids, pa.string()), "image": pa.array(blobs, pa.binary())})
        write_table(table, stage / f"part-{shards:05d}.parquet")
        shards, buffer = shards + 1, []

    # A window of a few loads per thread bounds memory to ~one shard of images however large the release.
    window = max(4 * cfg.network.concurrency, 16)
    buffered_bytes = 0
    with ThreadPoolExecutor(cfg.network.concurrency, thread_name_prefix="ingest") as pool:
        for chunk in _chunks(tasks, window):
            for task, result in zip(chunk, pool.map(lambda t: _load(t, folders, cfg), chunk), strict=True):
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


def ingest(cfg: IngestConfig) -> dict:
    """Write `articles/` and `images/` shards plus `ingest-summary.json` and `ingest-rejects.parquet`.

    Both folders are staged and replace the previous ones only when everything is written.
    """
    started = time.time()
    out = cfg.output
    frames, facts = [], {}
    folders: dict[str, tuple[Path, dict[str, str]]] = {}
    for part in cfg.parts:
        frame, facts[part.name] = read_part(part, cfg)
        frames.append(frame)
        if part.images is not None:
            folder = Path(part.images).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"parts[{part.name}].images: {folder} is not a folder")
            folders[part.name] = (folder, _folder_index(folder, cfg.image_extensions))
    articles, rejects = _article_rejects(pl.concat(frames, how="vertical_relaxed"), cfg)
    tasks = _image_tasks(articles, cfg, folders)

    with staged_dir(out, "articles") as article_stage, staged_dir(out, "images") as image_stage:
        article_shards = _write_articles(articles, article_stage, cfg.article_shard_rows)
        image_shards, failures = _write_images(tasks, folders, cfg, image_stage)

    rejects += [{"kind": "image", "id": image_id, "source": task.part.name, "row": task.row,
                 "reason": f"{result.kind}: {result.reason}" + (f": {result.detail}" if result.detail else "")}
                for image_id, (task, result) in failures.items()]
    missing = [i for i, (_, r) in failures.items() if r.kind == "missing"]
    unreadable = [i for i, (_, r) in failures.items() if r.kind == "unreadable"]
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


def format_summary(summary: dict) -> str:
    """A few lines for the terminal: what was written and what was missing or unreadable, by part and reason."""
    lines = [f"ingest: {summary['articles']} articles in {summary['article_shards']} shard(s), {summary['images']} "
             f"images in {summary['image_shards']} shard(s) under {summary['output_dir']} ({summary['seconds']}s)"]
    for name, f in summary["parts"].items():
        lines.append(f"  {name}: {f['rows']} rows -> {f['articles']} articles ({f['rejected_rows']} rejected rows, "
                     f"{f['articles_without_image_id']} without image id); images: {f['images']} written, "
                     f"{f['images_missing']} missing, {f['images_unreadable']} unreadable"
                     + (f"; {f['published_unparsed']} unparsable dates" if f["published_unparsed"] else ""))
    if summary["reasons"]:
        lines.append(f"  reasons (every row: {summary['output_dir']}/ingest-rejects.parquet):")
        lines += [f"    {count:6d}  {reason}" for reason, count in summary["reasons"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `newsclip ingest CONFIG [--set k=v]` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "ingest", help="turn NewsImages CSV/TSV files and image folders (or URLs) into the input Parquet shards",
        description="Read each part's CSV/TSV file and images; write OUTPUT/articles/ and OUTPUT/images/ in the "
                    "input contract, ingest-summary.json and ingest-rejects.parquet. See jobs/ingest.yaml.")
    parser.add_argument("config", type=Path, help="ingest config (YAML), e.g. jobs/ingest.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set output_dir=data/ni --set network.enabled=true")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run `newsclip ingest`; ConfigError/IngestError/FileNotFoundError propagate (the CLI maps them to exit 2)."""
    cfg = load(args.config, args.overrides)
    print(format_summary(ingest(cfg)))
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m newsclip.ingest")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ingest", *(sys.argv[1:] if argv is None else argv)])
    try:
        return main(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"newsclip ingest: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_standalone())


__all__ = ["IngestConfig", "NetworkConfig", "PartConfig", "ColumnsConfig", "IngestError", "UnsafePath", "add_parser",
           "fetch", "format_summary", "ingest", "load", "main", "read_part", "safe_path"]
