"""The embedding store over many nights: what it holds and which runs use it (stats), and dropping the rows that
none of a job's last runs uses (compact), without a moment where a row that a run needs is missing."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from newsclip.config import JobConfig
from newsclip.runtime.embedding_store import checkpoint_of, store_refs
from newsclip.runtime.layout import Layout
from newsclip.runtime.runner import _exclusive
from newsclip.runtime.store import read_manifest

PART_ROWS = 50_000  # rows per compacted part: 200 MB of 1024-d float32 at most in memory, few files to look up
STAGED = ".compact-"  # prefix of compacted parts not yet swapped in (EmbeddingStore reads only part-*.parquet)


class StoreError(ValueError):
    """The store cannot be compacted safely as things are; the message says what to do."""


@dataclass(frozen=True)
class Folder:
    """One store folder: `<backbone slug>/<checkpoint>-<precision>[-variants]/<side>` under the store's root."""

    name: str
    rows: int
    bytes: int
    parts: int

    @property
    def backbone(self) -> str:
        return self.name.split("/")[0]

    @property
    def checkpoint(self) -> str:
        return checkpoint_of(self.name.split("/")[1])

    @property
    def precision(self) -> str:  # with the preprocess variants, e.g. fp16-nvjpeg (encoding.store_label)
        return self.name.split("/")[1].partition("-")[2]

    @property
    def side(self) -> str:
        return self.name.split("/")[2]


def folders(root: Path) -> list[Folder]:
    """Every store folder under `root` with its rows (from the Parquet footers), bytes and parts."""
    found = []
    for folder in sorted({p.parent for p in root.glob("*/*/*/part-*.parquet")}):
        parts = _parts(folder)
        found.append(Folder(folder.relative_to(root).as_posix(), sum(pq.read_metadata(p).num_rows for p in parts),
                            sum(p.stat().st_size for p in parts), len(parts)))
    return found


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def run_records(output: Path) -> list[dict]:
    """The job's run records (`runs/<run id>.json`), oldest first: run ids begin with their UTC start time."""
    return [json.loads(p.read_text()) for p in sorted(Layout(output).runs.glob("*.json"))]


def _committed(run: dict) -> bool:
    """Whether a run committed something: a rerun with nothing to do, or a call that failed before its first commit,
    is no run that `--keep-runs` counts."""
    return any(stage.get("status") == "done" for stage in run.get("stages", {}).values())


def stats(cfg: JobConfig) -> dict:
    """What the store holds, folder by folder, which of the job's runs reference each folder's rows, and per run
    how many rows it references (None: it recorded none, having died or run before runs recorded them)."""
    if not cfg.store.is_dir() and not cfg.layout.runs.is_dir():
        raise StoreError(f"no store at {cfg.store} and no runs in {cfg.layout.runs}: check output_dir and "
                         "store_dir (--set output_dir=...), or run the job first")
    users: dict[str, list[str]] = {}  # store folder -> ids of the runs whose refs name it
    runs = []
    for run in run_records(cfg.output):
        refs = run.get("store_refs")
        present = [f for f in refs or [] if (cfg.output / f).is_file()]
        for f in present:
            users.setdefault(_folder_of(cfg.output, f), []).append(run["run_id"])
        runs.append({"run_id": run["run_id"], "status": run.get("status", "?"),
                     "rows": None if refs is None else sum(pq.read_metadata(cfg.output / f).num_rows for f in present),
                     "pruned": len(refs or []) - len(present)})
    return {"store": str(cfg.store), "shared": not _own_store(cfg), "folders": folders(cfg.store), "users": users,
            "runs": runs}


def compact(cfg: JobConfig, keep_runs: int, only_this_job: bool = False) -> dict:
    """Drop every store row that none of the job's last `keep_runs` runs references (nor the outputs as they are
    now), and the refs files only older runs name. Returns the folders before and after, and the runs kept.

    A folder that loses rows is rewritten: its kept rows go to new parts written beside the old ones, which are
    then renamed in, and only then are the old parts deleted. A crash at any moment leaves every kept row in
    some part (at worst twice, which lookups tolerate and the next compaction cleans)."""
    if keep_runs < 1:
        raise StoreError(f"--keep-runs must be at least 1, got {keep_runs}")
    if not cfg.output.is_dir():
        raise StoreError(f"output_dir {cfg.output} does not exist: check the job file or --set output_dir=...")
    if not _own_store(cfg) and not only_this_job:
        raise StoreError(f"the store {cfg.store} is outside output_dir {cfg.output} (store_dir is set), so other jobs "
                         "may use it, and compacting would drop the rows only they use (they would encode them "
                         "again) or fail a run of theirs under way; pass --only-this-job to compact it anyway")
    with _exclusive(cfg.output):  # the runner's own lock: no run of this job encodes meanwhile
        runs, keep_files = _referenced(cfg, keep_runs)
        keep = _keys_by_folder(cfg.output, keep_files)
        before = folders(cfg.store)
        for folder in before:
            _compact_folder(cfg.store / folder.name, keep.get(folder.name, pa.array([], pa.string())))
        pruned = _prune_refs(cfg.output, keep_files)
    return {"store": str(cfg.store), "runs": [r["run_id"] for r in runs], "before": before,
            "after": folders(cfg.store), "pruned_refs": pruned}


def _own_store(cfg: JobConfig) -> bool:
    return cfg.store.resolve().is_relative_to(cfg.output.resolve())


def _folder_of(output: Path, refs: str) -> str:
    """The store folder a refs file (`store-refs/<folder>/<digest>.parquet`, relative to `output`) is about."""
    return (output / refs).parent.relative_to(Layout(output).store_refs).as_posix()


def _referenced(cfg: JobConfig, keep_runs: int) -> tuple[list[dict], set[str]]:
    """The last `keep_runs` run records and the refs files to keep: theirs, and those of the outputs as they are
    now (the runner records a run's refs when it ends, so a run that died has none of its own)."""
    out = cfg.output
    runs = [run for run in run_records(out) if _committed(run)][-keep_runs:]
    if not runs:
        raise StoreError(f"{cfg.layout.runs}: no run of this job is recorded, so nothing says which store rows are "
                         "needed; run the job (`newsclip run JOB.yaml`) first, or check output_dir")
    stages = read_manifest(out).get("stages", {})
    unrecorded = sorted(name for name, e in stages.items()
                        if "store" in e and "refs" not in e and e.get("backbone") in cfg.backbones)
    current = store_refs(out, cfg.backbones)
    if unrecorded or not current:
        raise StoreError(f"{out}: the encode stage has not recorded which store rows it uses "
                         f"({', '.join(unrecorded) or 'no encode entry in manifest.json'}): it last ran before "
                         "newsclip recorded them; run `newsclip encode JOB.yaml` once (it reuses the store and "
                         "encodes nothing new), then compact")
    missing = [f for f in current if not (out / f).is_file()]
    if missing:
        raise StoreError(f"{out}: {missing[0]} is missing, so the rows the current outputs use are unknown; run "
                         "`newsclip encode JOB.yaml` to record them again, then compact")
    # a kept run's refs file that is gone was pruned by an earlier compaction that did not keep that run: its rows
    # are gone too, so it asks nothing more
    return runs, {f for f in {*current, *(f for r in runs for f in r.get("store_refs", []))} if (out / f).is_file()}


def _keys_by_folder(output: Path, refs_files: set[str]) -> dict[str, pa.Array]:
    """Store folder -> the keys that the refs files name there."""
    by_folder: dict[str, list[pa.Array]] = {}
    for refs in sorted(refs_files):
        keys = pq.read_table(output / refs).column("hash").combine_chunks()
        by_folder.setdefault(_folder_of(output, refs), []).append(keys)
    return {name: pc.unique(pa.concat_arrays(keys)) for name, keys in by_folder.items()}


def _compact_folder(folder: Path, keep: pa.Array) -> None:
    """Rewrite `folder` with its rows whose key is in `keep`, each once; untouched when it would lose nothing."""
    for leftover in folder.glob(f"{STAGED}*"):  # what an earlier compaction wrote before it crashed
        leftover.unlink()
    old = _parts(folder)
    hashes = [pq.read_table(p, columns=["hash"]).column("hash").combine_chunks() for p in old]
    every = pa.concat_arrays(hashes)
    # a row is kept when it is referenced and its key's first (a key stored twice: two runs at once, or an
    # earlier crash here), as EmbeddingStore.lookup takes the first too
    _, first = np.unique(every.to_numpy(zero_copy_only=False), return_index=True)
    wanted = np.zeros(len(every), bool)
    wanted[first] = True
    wanted &= pc.is_in(every, value_set=keep).to_numpy(zero_copy_only=False)
    if wanted.all():
        return
    staged, pending, offset = [], [], 0
    try:
        for part, part_hashes in zip(old, hashes):
            rows = np.flatnonzero(wanted[offset:offset + len(part_hashes)])
            offset += len(part_hashes)
            if len(rows):
                pending.append(pq.read_table(part).take(pa.array(rows)))
            if pending and (sum(map(len, pending)) >= PART_ROWS or part == old[-1]):
                staged.append(_write_staged(folder, pa.concat_tables(pending)))
                pending.clear()
    except BaseException:
        for path in staged:
            path.unlink(missing_ok=True)
        raise
    _swap(folder, staged, old)


def _write_staged(folder: Path, table: pa.Table) -> Path:
    """A compacted part under a name EmbeddingStore does not read, on disk (fsync) before anything is deleted."""
    path = folder / f"{STAGED}{uuid.uuid4().hex}.parquet"
    pq.write_table(table, path)
    _fsync(path)
    return path


def _swap(folder: Path, staged: list[Path], old: list[Path]) -> None:
    """Rename the compacted parts in, make the renames durable, then delete the old parts: until the last step
    every kept row is in an old part, after it in a new one."""
    for path in staged:
        _bring_in(path, folder / f"part-{uuid.uuid4().hex}.parquet")
    _fsync(folder)
    for path in old:
        _retire(path)
    if not staged:  # nothing kept: the folder goes, and its parents when they are empty
        for empty in (folder, folder.parent, folder.parent.parent):
            if any(empty.iterdir()):
                break
            empty.rmdir()


def _bring_in(staged: Path, part: Path) -> None:
    os.replace(staged, part)


def _retire(part: Path) -> None:
    part.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune_refs(output: Path, keep_files: set[str]) -> int:
    """Delete the refs files that no kept run names (their rows are gone); returns how many."""
    pruned = 0
    refs = Layout(output).store_refs
    for path in sorted(refs.glob("*/*/*/*.parquet")):
        if path.relative_to(output).as_posix() not in keep_files:
            path.unlink()
            pruned += 1
    folders_left = [p for p in refs.rglob("*") if p.is_dir()]
    for folder in sorted(folders_left, key=lambda p: -len(p.parts)):  # deepest first: a parent empties after
        if not any(folder.iterdir()):
            folder.rmdir()
    return pruned
