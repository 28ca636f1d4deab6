"""Files on disk: finding input shards, atomic commits, the manifest, and embedding tables."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from newsclip.runtime.layout import STAGING, Layout
from newsclip.runtime.stage_clock import lap

# bytes read from a Parquet file at a time when it is streamed: Arrow's default pre-buffering caches every row group
# it has read until the file is closed (a 1.1 GB rankings file read forward took 1.1 GB of the driver)
READ_BUFFER = 8 << 20


class OutputFolderError(ValueError):
    """An output folder that is a file, or that cannot be made or written."""


def output_folder(path: Path, what: str, make: bool = True) -> Path:
    """`path` as a folder to write in, made if missing (unless not `make`); OutputFolderError naming `what` (the
    setting or argument that gave it) and what to do when it is a file or cannot be made."""
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{what}: {path} is a file, not a folder; choose a folder (a new one is made)")
    if not make:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(f"{what}: cannot make the folder {path} ({e.strerror}); choose a folder you can "
                                "write in") from None
    return path


def parquet_files(spec: str | Path, what: str = "input") -> list[Path]:
    """The Parquet shards named by a folder or a glob, sorted; a clear error when there are none."""
    spec = str(Path(spec).expanduser())
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in glob.glob(spec, recursive=True)]
    elif Path(spec).is_dir():
        files = list(Path(spec).rglob("*.parquet"))
    elif Path(spec).is_file():
        files = [Path(spec)]
    else:
        raise FileNotFoundError(f"{what}: {spec} does not exist (expected a folder or glob of Parquet shards)")
    files = sorted(f for f in files if f.suffix == ".parquet" and STAGING not in f.parts)
    if not files:
        raise FileNotFoundError(f"{what}: no *.parquet files under {spec}")
    return files


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends without an error, so a
    reader sees the old file or the whole new one, never part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_batches(path: Path, batch_size: int = 65536, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """A Parquet file's record batches, read forward in bounded memory (see READ_BUFFER)."""
    with pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER) as file:
        yield from file.iter_batches(batch_size=batch_size, columns=columns)


def write_table(table: pa.Table, path: Path) -> Path:
    """Write one Parquet file atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_tables(tables: Iterable[pa.Table], path: Path) -> int:
    """Write tables of one schema (at least one table, maybe empty) as one Parquet file, atomically, holding one
    table at a time; the rows written."""
    rows = 0
    with atomic_path(path) as tmp, contextlib.ExitStack() as stack:
        writer = None
        for table in tables:
            writer = writer or stack.enter_context(pq.ParquetWriter(tmp, table.schema))
            writer.write_table(table)
            rows += len(table)
        if writer is None:
            raise ValueError(f"{path}: no table to write")
    return rows


# rows of a row group that `RowGroupWriter` writes, at most: what it holds. pq.write_table cuts at 1,048,576 rows,
# which would hold that many rows (a driver's 100s of MB): a file of up to ROW_GROUP rows has the same bytes either way
ROW_GROUP = 128 * 1024


class RowGroupWriter:
    """One Parquet file written from tables as they come, in row groups of ROW_GROUP rows (the last fewer), holding
    at most one row group: a file of at most ROW_GROUP rows has the bytes `pq.write_table` gives all at once."""

    def __init__(self, path: Path):
        self.path, self.rows = path, 0
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(path))
        self._writer = None
        self._held: list[pa.Table] = []
        self._held_rows = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = self._stack.enter_context(pq.ParquetWriter(self._tmp, table.schema))
            self._schema = table.schema
        self._held.append(table)
        self._held_rows += len(table)
        self.rows += len(table)
        if self._held_rows >= ROW_GROUP:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        held = pa.concat_tables(self._held).combine_chunks() if self._held else self._schema.empty_table()
        whole = len(held) if final else len(held) // ROW_GROUP * ROW_GROUP
        if whole or (final and self.rows == 0):
            self._writer.write_table(held.slice(0, whole))
        self._held = [held.slice(whole)] if whole < len(held) else []
        self._held_rows = len(held) - whole

    def close(self) -> Path:
        """Write what is held and commit the file (at least one table must have come, maybe empty)."""
        if self._writer is None:
            self._stack.close()
            raise ValueError(f"{self.path}: no table to write")
        self._flush(final=True)
        self._stack.close()
        return self.path

    def abort(self) -> None:
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_stream(tables: Iterable[pa.Table], path: Path) -> int:
    """Write tables of one schema (at least one, maybe empty) as one Parquet file, atomically, holding at most one
    row group (see RowGroupWriter); the rows written."""
    writer = RowGroupWriter(path)
    try:
        for table in tables:
            writer.write(table)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.rows


def write_text(path: Path, text: str) -> Path:
    """Write one text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


@contextlib.contextmanager
def staged_dir(output: Path, relative: str) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `output/relative` whole, on error it vanishes.

    Readers never see a half-written folder: the old one stays until the new one is complete."""
    final = output / relative
    stage = Layout(output).staging / f"{relative.replace('/', '__')}-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = stage.with_name(stage.name + ".old")
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """One sha256 for several files in order (of their own digests): what a stage committed, for the manifest."""
    return hashlib.sha256(" ".join(file_sha256(p) for p in paths).encode()).hexdigest()


def read_manifest(output: Path) -> dict:
    """`output`'s manifest.json (what each stage committed); {} before anything was committed."""
    path = Layout(output).manifest
    return json.loads(path.read_text()) if path.exists() else {}


_MANIFEST_LOCK = threading.Lock()  # backbones encoded side by side record their stages from several threads


def _update_manifest(output: Path, update) -> None:
    with _MANIFEST_LOCK:
        manifest = {"stages": {}, "completed": {}, "runs": [], **read_manifest(output)}
        update(manifest)
        write_text(Layout(output).manifest, json.dumps(manifest, indent=2, sort_keys=True))


def record_stage(output: Path, stage: str, files: list[Path], **facts) -> dict:
    """Add a committed stage to `manifest.json` with its files, row counts and content hash, and, in a stage the runner
    runs, the seconds its work took (see stage_clock)."""
    files = sorted(files)
    entry = {
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [str(f.relative_to(output)) for f in files],
        "sha256": files_sha256(files),
        **facts,
    }
    seconds = lap()
    if seconds is not None:
        entry.setdefault("seconds", seconds)
    _update_manifest(output, lambda m: m["stages"].__setitem__(stage, entry))
    return entry


def record_completed(output: Path, stage: str, key: str | None, entries: list[dict] = ()) -> list[str]:
    """Mark a pipeline stage finished: the key of the work it did, a digest of what it committed, and its files
    (those its entries name, and their `rejects` file). Returns the files its earlier commits named that this one
    does not (a fusion or direction no longer configured): no longer current, for the caller to delete; the
    manifest entries that name only such files are dropped.

    A key of None marks it unfinished (it is running): a crash then leaves it to be redone, and the files of its
    last commit are kept under `superseded` until a commit of the stage replaces them."""
    stale: list[str] = []

    def start(m: dict) -> None:
        done = m["completed"].pop(stage, None)
        if done:
            superseded = m.setdefault("superseded", {})
            superseded[stage] = sorted({*superseded.get(stage, []), *done["files"]})

    def finish(m: dict) -> None:
        before = {*m.get("superseded", {}).pop(stage, []), *m["completed"].get(stage, {}).get("files", [])}
        if "superseded" in m and not m["superseded"]:
            del m["superseded"]
        m["completed"][stage] = {"key": key, "digest": digest, "files": files}
        stale.extend(sorted(before - set(files)))
        # the entries of what is gone go too: a report must not read the facts of rankings that no longer exist
        for name in [n for n, e in m["stages"].items() if e.get("files") and set(e["files"]) <= set(stale)]:
            del m["stages"][name]

    if key is None:
        _update_manifest(output, start)
        return stale
    digest = hashlib.sha256(json.dumps(sorted(e["sha256"] for e in entries)).encode()).hexdigest()
    files = sorted({f for e in entries for f in [*e["files"], *([e["rejects"]] if e.get("rejects") else [])]})
    _update_manifest(output, finish)
    return stale


def current_files(output: Path) -> list[str]:
    """The files the manifest says the stages committed last and are current, relative to `output`."""
    return sorted({f for done in read_manifest(output).get("completed", {}).values() for f in done["files"]})


RUNS_KEPT = 30  # run records in manifest.json (all of them stay in runs/)


def record_run(output: Path, record: dict) -> None:
    _update_manifest(output, lambda m: m.__setitem__("runs", [*m["runs"], record][-RUNS_KEPT:]))


def embedding_table(ids: np.ndarray | list, vectors: np.ndarray, id_name: str) -> pa.Table:
    """Ids beside L2-normalised float32 vectors as a plain Arrow `fixed_size_list<float>[dim]`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return pa.table({id_name: pa.array(ids, pa.string()), "embedding": column})


def read_embeddings(folder: Path, id_name: str) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, vectors) under an embeddings folder; the vectors are a zero-copy view of the Arrow buffer."""
    table = pq.read_table(parquet_files(folder, f"embeddings {folder}"), columns=[id_name, "embedding"])
    return table.column(id_name).to_numpy(zero_copy_only=False), vectors_of(table.column("embedding"))


def vectors_of(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """A `fixed_size_list<float>[dim]` column as a (rows, dim) float32 matrix, without a copy where Arrow allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
