"""A loaded, immutable snapshot of one committed run's index: per backbone the image and text embeddings (one
contiguous float32 matrix each, rows in id order, loaded once), the ranked images per article, and the articles and
image files they belong to. `load_snapshot` reads it only from a run that finished and checks that no other run
committed while it read."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from newsclip.config import JobConfig
from newsclip.names import checkpoint_label, is_fusion, looks_like_path, rankings_stem, slug
from newsclip.runtime.console import warn
from newsclip.runtime.embedding_store import checkpoint_of
from newsclip.runtime.store import parquet_files, read_manifest, vectors_of
from newsclip.serve.nearest import best_k, nearest, row_norm_bound


class IndexNotReady(RuntimeError):
    """No finished run to serve yet, or a run is committing: the caller keeps what it serves and tries later."""


class SortedIds:
    """Ids in Arrow's (UTF-8 byte) order, found by bisection: no hash table of a million ids per snapshot."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids  # object array of str, sorted

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, key: str) -> int | None:
        i = bisect.bisect_left(self.ids, key)
        return i if i < len(self.ids) and self.ids[i] == key else None


def _sorted(table: pa.Table, id_column: str) -> pa.Table:
    return table.take(pc.sort_indices(table.column(id_column)))


@dataclass(frozen=True)
class Side:
    """One side's rows (images or texts) of one backbone: ids, vectors in their order, content hashes."""

    ids: SortedIds
    vectors: np.ndarray  # (n, d) float32, C-contiguous
    max_norm: float
    hash_rows: dict[str, int] = field(default_factory=dict)  # content hash -> row (texts: a query found as is)
    gpu: Any = None  # the rows on this process's GPU too (`on_gpu`), searched there
    int8: Any = None  # the rows as int8 too (`for_serving`), read by the CPU's pass

    @property
    def device(self) -> str:
        """Where a search of this side runs: cpu, or the GPU's torch device (cuda:0)."""
        return self.gpu.rows.info["device"] if self.gpu is not None else "cpu"

    @property
    def search(self) -> str:
        """How a search of this side runs, as /healthz says: cpu, cpu int8 (the pass reads `int8`), or cuda:0."""
        return self.device + (" int8" if self.int8 is not None else "")

    @property
    def nbytes(self) -> int:
        """The memory its rows take in this process: float32, and the int8 copy."""
        return self.vectors.nbytes + (self.int8.blocks.nbytes if self.int8 is not None else 0)

    def on_gpu(self) -> Side:
        """This side with its rows on the process's GPU as well, where the knn stage's torch engine searches them
        (fp16 products, exact re-scores: the same answers as the CPU's pass); as it is without a GPU or room on it."""
        from newsclip.retrieval.search import gpu_shard

        try:
            shard = gpu_shard(self.vectors)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError among them: the CPU's pass still answers
            warn(f"serve: {len(self.ids)} rows stay on the CPU: {' '.join(str(e).split())[:300]}")
            return self
        return self if shard is None else replace(self, gpu=shard)

    def for_serving(self) -> Side:
        """This side as a server searches it: on the process's GPU where it has one (`on_gpu`), else with an int8 copy
        of its rows for the CPU's pass from MIN_VALUES rows x dimensions on (a quarter of the bytes: the same answers,
        1.3 to 3 times faster for up to MAX_QUERIES queries a pass)."""
        from newsclip.serve import int8_rows

        side = self.on_gpu()
        if side.gpu is not None or self.vectors.size < int8_rows.MIN_VALUES:
            return side
        return replace(side, int8=int8_rows.Int8Rows.of(self.vectors))

    @classmethod
    def from_arrays(cls, ids, vectors: np.ndarray, hashes=None) -> Side:
        """A side from ids and vectors in any order (sorted here), e.g. synthetic ones for a benchmark."""
        order = pc.sort_indices(pa.array(ids, pa.string())).to_numpy()
        vectors = np.ascontiguousarray(np.asarray(vectors, np.float32)[order])
        hash_rows = {} if hashes is None else {h: i for i, h in enumerate(np.asarray(hashes, object)[order])}
        return cls(SortedIds(np.asarray(ids, object)[order]), vectors, row_norm_bound(vectors), hash_rows)

    @classmethod
    def read(cls, folder: Path, id_column: str) -> Side:
        table = _sorted(pq.read_table(parquet_files(folder, f"embeddings {folder}")), id_column)
        vectors = np.ascontiguousarray(vectors_of(table.column("embedding")), np.float32)
        hashes = table.column("hash").to_numpy(zero_copy_only=False)
        ids = table.column(id_column).to_numpy(zero_copy_only=False)
        return cls(SortedIds(ids), vectors, row_norm_bound(vectors), {h: i for i, h in enumerate(hashes)})

    def nearest(self, q: np.ndarray, k: int, map_steps=map) -> list[list[tuple[str, float]]]:
        """Each query's k best (id, score), best first (`map_steps`: see `nearest`)."""
        if self.gpu is not None:
            rows, scores = best_k(*self.gpu.search(np.ascontiguousarray(q, np.float32), k), min(k, len(self.ids)))
        else:
            rows, scores = nearest(self.vectors, self.max_norm, q, k, map_steps, self.int8)
        return [[(self.ids.ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]


@dataclass(frozen=True)
class Rankings:
    """The committed rankings of one backbone, text to image: per article its ranked images and scores."""

    articles: SortedIds
    lists: pa.ListArray
    scores: pa.ListArray

    @classmethod
    def read(cls, path: Path) -> Rankings | None:
        if not path.exists():
            return None
        table = _sorted(pq.read_table(path, columns=["article_id", "image_ids", "scores"]), "article_id")
        return cls(SortedIds(table.column("article_id").to_numpy(zero_copy_only=False)),
                   table.column("image_ids").combine_chunks(), table.column("scores").combine_chunks())

    def of(self, article_id: str) -> list[tuple[str, float]] | None:
        row = self.articles.find(article_id)
        if row is None:
            return None
        return [(i, s) for i, s in zip(self.lists[row].as_py(), self.scores[row].as_py()) if i is not None]


@dataclass(frozen=True)
class BackboneIndex:
    """One backbone's part of a snapshot."""

    name: str
    images: Side
    texts: Side | None
    rankings: Rankings | None
    checkpoint: str | None = None  # the checkpoint id of the weights its embeddings were made with


@dataclass(frozen=True)
class Articles:
    """The run's articles: title, the image each uses, and the articles of each image."""

    ids: SortedIds
    titles: list[str | None]
    image_of: list[str | None]
    by_image: dict[str, list[str]]

    @classmethod
    def empty(cls) -> Articles:
        return cls(SortedIds(np.array([], object)), [], [], {})

    def title(self, article_id: str) -> str | None:
        row = self.ids.find(article_id)
        return None if row is None else self.titles[row]

    def using(self, image_id: str) -> list[str]:
        return self.by_image.get(image_id, [])


@dataclass(frozen=True)
class ImageFiles:
    """Which input shard holds each image (for thumbnails): positions into `files`, rows in id order."""

    ids: SortedIds
    file_of: np.ndarray  # int32 per id
    files: list[str]

    def file(self, image_id: str) -> str | None:
        row = self.ids.find(image_id)
        return None if row is None else self.files[int(self.file_of[row])]


@dataclass(frozen=True)
class Snapshot:
    """What one committed run serves. Immutable: a newer run is another Snapshot, swapped in whole."""

    run_id: str
    backbones: dict[str, BackboneIndex]
    articles: Articles
    images: ImageFiles | None
    signature: str = ""  # the manifest it was read under

    @property
    def default_backbone(self) -> str:
        return next(iter(self.backbones))

    def backbone_named(self, name: str) -> str | None:
        """The backbone the job calls `name`, or the checkpoint that reports and tables call so (`demo/model.pt`
        for `out/finetune/demo/model.pt`: a job's labels are unique); None for neither."""
        if name in self.backbones:
            return name
        labelled = [b for b in self.backbones if looks_like_path(b) and checkpoint_label(b) == name]
        return labelled[0] if len(labelled) == 1 else None

    def sizes(self) -> dict:
        return {"articles": len(self.articles.ids),
                "backbones": {name: {"images": len(b.images.ids), "texts": len(b.texts.ids) if b.texts else 0,
                                     "dim": int(b.images.vectors.shape[1]), "search": b.images.search,
                                     "embeddings_mb": round((b.images.nbytes + (b.texts.nbytes if b.texts else 0))
                                                            / 2**20, 1)}
                              for name, b in self.backbones.items()}}


def _run_to_serve(manifest: dict) -> str:
    """The last run, when it finished and no stage is committing; else IndexNotReady."""
    runs = manifest.get("runs", [])
    if not runs:
        raise IndexNotReady("no run has finished yet: run the job (`newsclip run JOB.yaml`)")
    last = runs[-1]
    if last.get("status") != "finished":
        raise IndexNotReady(f"the last run ({last.get('run_id')}) did not finish ({last.get('status')})")
    done = manifest.get("completed", {})
    for stage in ("prepare", "encode", "knn"):
        if not done.get(stage, {}).get("key"):
            raise IndexNotReady(f"stage {stage} is running or has not committed")
    finished = last.get("finished_at", "")
    later = [n for n, e in manifest.get("stages", {}).items() if e.get("committed_at", "") > finished]
    if later:  # a later run is committing stage by stage (its record comes at its end)
        raise IndexNotReady(f"a run after {last.get('run_id')} is committing ({', '.join(sorted(later))})")
    return last["run_id"]


def _running(record: Path) -> bool:
    try:
        return json.loads(record.read_text()).get("status") == "running"
    except (OSError, ValueError):  # being replaced: a run is writing it
        return True


def _signature(manifest: dict) -> str:
    return json.dumps({k: manifest.get(k) for k in ("completed", "stages", "runs")}, sort_keys=True)


def load_snapshot(cfg: JobConfig, serving: bool = False) -> Snapshot:
    """The index of the job's last finished run, its sides `for_serving` when `serving` (a server's many queries; a
    single search reads the float32 rows as they are). Raises IndexNotReady when there is none, or when a run committed
    while it was read (the manifest changed: every commit changes it first), so a half-new index is never returned."""
    out = cfg.output
    before = read_manifest(out)
    run_id = _run_to_serve(before)
    if any(_running(p) for p in cfg.layout.runs.glob("*.json") if p.stem > run_id):
        raise IndexNotReady(f"a run started after {run_id} and has not finished")
    try:
        snapshot = _read(cfg, run_id, before, serving)
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:  # a file replaced under us by a new run
        raise IndexNotReady(f"reading the index of run {run_id} failed ({type(e).__name__}: {e})") from None
    _check_weights(cfg, snapshot)
    if _signature(read_manifest(out)) != snapshot.signature:
        raise IndexNotReady(f"a run committed while the index of run {run_id} was read")
    return snapshot


def _check_weights(cfg: JobConfig, snapshot: Snapshot) -> None:
    """IndexNotReady unless this process would encode queries with the weights each backbone's embeddings were made
    with (their store folder names them): a query encoded by other weights would get scores that mean nothing."""
    for name, backbone in snapshot.backbones.items():
        if not backbone.checkpoint:  # a run from before the store: nothing to compare
            continue
        try:
            here = cfg.resolved(name)
        except FileNotFoundError as e:
            raise IndexNotReady(f"{name}: no weights here to encode queries with: {e}") from None
        if here.checkpoint_id != backbone.checkpoint:
            raise IndexNotReady(
                f"run {snapshot.run_id}'s {name} embeddings were made with weights {backbone.checkpoint}, and queries "
                f"here would be encoded with {here.checkpoint_id} ({here.weights}): point encode.download_root (or "
                f"$NEWSCLIP_CACHE) at the weights the run used, or run the job again with these")


def _read(cfg: JobConfig, run_id: str, manifest: dict, serving: bool) -> Snapshot:
    layout = cfg.layout

    def side(folder: Path, id_column: str) -> Side:
        read = Side.read(folder, id_column)
        return read.for_serving() if serving else read

    backbones = {}
    for backbone in cfg.backbones:
        if is_fusion(backbone):  # fused rankings have no embeddings of their own to search
            continue
        name = slug(backbone)
        texts_dir = layout.embeddings_of(name, "texts")
        store = manifest.get("stages", {}).get(f"encode:{name}:images", {}).get("store")
        backbones[backbone] = BackboneIndex(
            backbone, side(layout.embeddings_of(name, "images"), "image_id"),
            side(texts_dir, "article_id") if texts_dir.is_dir() else None,
            Rankings.read(layout.rankings_parquet(rankings_stem(backbone, "text_to_image"))),
            checkpoint_of(Path(store).parent.name) if store else None)
    if not backbones:
        raise IndexNotReady("the job has no backbone with embeddings to search")
    return Snapshot(run_id, backbones, _articles(cfg), _image_files(cfg), _signature(manifest))


def _articles(cfg: JobConfig) -> Articles:
    prepared = pq.read_table(cfg.layout.prepared.articles, columns=["article_id", "image_id"])
    prepared = _sorted(prepared, "article_id")
    ids = prepared.column("article_id").to_numpy(zero_copy_only=False)
    titles: list[str | None] = [None] * len(ids)
    sorted_ids = SortedIds(ids)
    try:
        texts = pq.read_table(parquet_files(cfg.query_texts, "query texts"), columns=["article_id", "title"])
    except FileNotFoundError:
        texts = None
    if texts is not None:
        for article_id, title in zip(texts.column("article_id").to_pylist(), texts.column("title").to_pylist()):
            row = sorted_ids.find(article_id)
            if row is not None:
                titles[row] = title
    by_image: dict[str, list[str]] = {}
    image_of = prepared.column("image_id").to_pylist()
    for article_id, image_id in zip(ids, image_of):
        if image_id is not None:
            by_image.setdefault(image_id, []).append(article_id)
    return Articles(sorted_ids, titles, image_of, by_image)


def _image_files(cfg: JobConfig) -> ImageFiles:
    table = _sorted(pq.read_table(cfg.layout.prepared.candidates, columns=["image_id", "file"]), "image_id")
    encoded = table.column("file").combine_chunks().dictionary_encode()
    return ImageFiles(SortedIds(table.column("image_id").to_numpy(zero_copy_only=False)),
                      encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32), encoded.dictionary.to_pylist())
