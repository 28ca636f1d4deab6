"""The embedding store: per backbone checkpoint and side, embeddings keyed by content hash, so a nightly run
encodes only content it has never seen and reuses the rest; and the record of which rows each run uses."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from newsclip.runtime.layout import Layout
from newsclip.runtime.store import read_manifest, write_table

HASH_HEX = 32  # 128 bits of sha256: collisions are out of reach for any archive


def content_key(data: str | bytes) -> str:
    """The key of a text or an image file: sha256 of its UTF-8 text or its bytes (first 128 bits, hex)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:HASH_HEX]


def content_keys(values: Iterable[str | bytes | None]) -> pa.Array:
    return pa.array([None if v is None else content_key(v) for v in values], pa.string())


def checkpoint_of(version: str) -> str:
    """The checkpoint id in a store folder's `<checkpoint>-<precision>` part (16 hex digits: no dash in it)."""
    return version.partition("-")[0]


class EmbeddingStore:
    """`<root>/<backbone slug>/<checkpoint>-<precision>/<side>/part-*.parquet` with columns hash, embedding, error.

    A run only adds parts, each written atomically, so a crash loses at most the part being written and a
    rerun finds everything committed before it (`newsclip store compact` rewrites parts to drop rows that no
    recent run uses: newsclip.runtime.store_maintenance). Another checkpoint or precision is another folder: nothing
    encoded by other weights is ever reused. A failed row (an undecodable image) is stored with its error, so
    it is reported again without being decoded again."""

    def __init__(self, root: Path, backbone_slug: str, checkpoint: str, precision: str, side: str):
        self.name = f"{backbone_slug}/{checkpoint}-{precision}/{side}"  # its folder under the store's root
        self.dir = Path(root) / self.name

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []

    def hashes(self, parts: list[Path] | None = None) -> list[pa.Array]:
        """The stored hashes of each of `parts` (default: the parts now), in their order."""
        return [pq.read_table(p, columns=["hash"]).column("hash").combine_chunks()
                for p in (self.parts() if parts is None else parts)]

    def append(self, table: pa.Table) -> Path:
        """Commit one part (hash, embedding, error)."""
        return write_table(table.select(["hash", "embedding", "error"]), self.dir / f"part-{uuid.uuid4().hex}.parquet")

    def lookup(self, ids: pa.Array, hashes: pa.Array, id_name: str) -> Iterator[pa.Table]:
        """(id, embedding, hash, error) for each (id, hash), part by part; a hash not stored raises KeyError."""
        # one listing: a part another job commits meanwhile would shift the positions below onto other rows
        parts = self.parts()
        stored = self.hashes(parts)
        sizes = np.cumsum([0, *map(len, stored)])
        # a hash stored twice (two runs at once): index_in takes the first, so one row per id either way
        position = pc.index_in(hashes, value_set=pa.concat_arrays(stored) if stored else pa.array([], pa.string()))
        if position.null_count:
            missing = pc.filter(hashes, pc.is_null(position))[0].as_py()
            raise KeyError(f"hash {missing} is not in {self.dir}")
        position = position.to_numpy()
        part_of = np.searchsorted(sizes, position, side="right") - 1
        for i in np.unique(part_of):
            rows = np.flatnonzero(part_of == i)
            table = pq.read_table(parts[i]).take(pa.array(position[rows] - sizes[i]))
            rows = pa.array(rows)
            yield pa.table({id_name: ids.take(rows), "embedding": table.column("embedding"),
                            "hash": hashes.take(rows), "error": table.column("error")})


def write_refs(output: Path, store: EmbeddingStore, hashes: pa.Array | pa.ChunkedArray) -> str:
    """Record which rows of `store` a run's embeddings come from (what `newsclip store compact` keeps): one column
    `hash` in `output/store-refs/<store folder>/<digest>.parquet`, named by its content, so a night that uses the
    same rows as the last writes nothing. Returns its path relative to `output`."""
    keys = pc.drop_null(pc.unique(hashes))
    keys = keys.take(pc.sort_indices(keys))
    layout = Layout(output)
    path = layout.store_refs_file(store.name, content_key(" ".join(keys.to_pylist())))
    if not path.exists():
        write_table(pa.table({"hash": keys}), path)
    return layout.relative(path)


def store_refs(output: Path, backbones: Iterable[str]) -> list[str]:
    """The refs files (see write_refs) of the encode entries in `output`'s manifest for `backbones`: the store rows
    the job's outputs rest on now. The runner copies them into each run's record as `store_refs`."""
    backbones = set(backbones)
    stages = read_manifest(output).get("stages", {})
    return sorted(e["refs"] for e in stages.values() if "refs" in e and e.get("backbone") in backbones)
