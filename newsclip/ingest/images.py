"""Image tasks: one per distinct image id, loaded from its part's folder (else its URL) and checked to be an image.

An id that two parts share must name the same bytes in both.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from newsclip.ingest.config import IngestConfig, PartConfig
from newsclip.ingest.download import Fetched, fetch
from newsclip.ingest.errors import IngestError
from newsclip.ingest.paths import UnsafePath, read_capped, safe_path

# part name -> (its image folder, file stem -> file name in that folder)
Folders = dict[str, tuple[Path, dict[str, str]]]


@dataclass
class ImageTask:
    """One image to ingest: its contract id, where it may be found (file, URL) and the row that named it."""

    image_id: str
    part: PartConfig
    raw_id: str | None  # the id as in the files (before id_prefix): what an image file is named after
    file: str | None = None  # the `image_file` value, when the layout has one
    url: str | None = None
    row: int | None = None


def folder_index(folder: Path, extensions: tuple[str, ...]) -> dict[str, str]:
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


def image_folder(part: PartConfig, cfg: IngestConfig) -> tuple[Path, dict[str, str]] | None:
    """The part's image folder and its index; None when the part has none; FileNotFoundError if it is not a folder."""
    if part.images is None:
        return None
    folder = Path(part.images).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"parts[{part.name}].images: {folder} is not a folder")
    return folder, folder_index(folder, cfg.image_extensions)


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


def load_image(task: ImageTask, folders: Folders, cfg: IngestConfig) -> Fetched:
    """The task's image bytes (folder first, then URL when the network is enabled), or why there are none."""
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


def image_tasks(articles: pl.DataFrame, cfg: IngestConfig, folders: Folders) -> list[ImageTask]:
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


def _check_reused_ids(tasks: dict[str, ImageTask], elsewhere: dict[str, list[ImageTask]], folders: Folders,
                      cfg: IngestConfig) -> None:
    """An image id that two parts use must name the same bytes in both; otherwise every article would silently
    get the first part's image, so stop and say which id and parts."""
    for image_id, others in elsewhere.items():
        first = tasks[image_id]
        data = load_image(first, folders, cfg).data
        for other in others:
            if load_image(other, folders, cfg).data != data:
                raise IngestError(
                    f"image id {image_id!r} names different images in parts {first.part.name!r} and "
                    f"{other.part.name!r}: set id_prefix: true (ids become '<part>:<id>'), or give them distinct ids")
