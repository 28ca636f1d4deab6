"""The ingest job's config: parts (CSV/TSV file + image folder), column names, network settings; YAML loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from newsclip.yaml_config import ConfigError, build, read_yaml


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
    """An IngestConfig from a parsed mapping; ConfigError naming the bad key."""
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
