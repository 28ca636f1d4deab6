"""The job: stages in order, each reading the previous stage's committed output; Ray started on demand."""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import newsclip
from newsclip.config import JobConfig, dump
from newsclip.runtime import console, stage_clock
from newsclip.runtime.embedding_store import content_key, store_refs
from newsclip.runtime.layout import Layout
from newsclip.runtime.preflight import preflight
from newsclip.runtime.ray_setup import ensure_ray, ray_logs, wait_for_resources
from newsclip.runtime.stage import Stage
from newsclip.runtime.store import (
    OutputFolderError,
    output_folder,
    read_manifest,
    record_completed,
    record_run,
    write_text,
)
from newsclip.yaml_config import to_dict

STAGE_NAMES = ("prepare", "translate", "encode", "knn", "evaluate", "report")


def _stage(name: str) -> Stage:
    """A stage: the module `newsclip.stages.<name>`'s `run`, imported when a run names it (so a run of the last
    stages alone imports no torch, and none imports Ray before it uses it)."""
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"newsclip.stages.{name}").run


class RunLockedError(RuntimeError):
    """Another run holds the output folder."""


class StageOrderError(ValueError):
    """A stage named alone reads what earlier stages commit, and they have not committed in the output folder."""

    def __init__(self, stage: str, missing: list[str], output: Path):
        self.stage, self.missing = stage, missing
        which = ", ".join(missing)
        super().__init__(f"{stage} reads what {which} commit{'s' if len(missing) == 1 else ''}, and "
                         f"{'it has' if len(missing) == 1 else 'they have'} not committed in {output}")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during a run: what it had committed stays, and the same command resumes."""

    def __init__(self, stage: str | None):
        self.stage = stage
        super().__init__(stage)


def stage_key(cfg: JobConfig, stage: Stage, completed: dict) -> str:
    """The identity of a stage's work: the config (the sections it reads; all but `ray` if it does not say), the
    earlier stages' outputs, and its inputs outside the output folder. So another backbone list (`newsclip
    finetune`'s comparison, a backbone added) reuses the stages that read no backbone."""
    settings = to_dict(cfg)
    settings.pop("ray")
    if stage.sections is not None:
        settings = {section: settings[section] for section in stage.sections}
    upstream = {n: completed.get(n, {}).get("digest") for n in STAGE_NAMES[: STAGE_NAMES.index(stage.name)]}
    return content_key(json.dumps([stage.name, settings, upstream, stage.inputs_outside(cfg)], sort_keys=True))


COUNTS = ("rows", "new", "encoded", "reused", "rejected", "skipped")  # summed over a stage's entries in the run log


def _summary(entries: list[dict]) -> dict:
    """A stage's facts for the run log: its manifest entry's, or for several (backbones, sides) the summed counts."""
    if len(entries) == 1:
        return {k: v for k, v in entries[0].items() if k not in ("files", "sha256", "committed_at", "seconds")}
    return {key: sum(e[key] for e in entries if key in e) for key in COUNTS if any(key in e for e in entries)}


@contextlib.contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """One run per output folder at a time; the kernel drops the lock when the process dies, however it dies."""
    import fcntl

    lock = Layout(output).lock
    try:
        handle = open(lock, "a")  # noqa: SIM115 - "a": taking the lock changes no file
    except OSError as e:
        raise OutputFolderError(f"output_dir: cannot write in {output} ({e.strerror}: {lock}); make it writable, or "
                                "set output_dir to a folder you can write in") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"{output}: another newsclip run is using this output_dir; wait for it to finish") \
                from None
        yield


_HELD: set[Path] = set()  # the output folders whose lock this process holds through job_lock


@contextlib.contextmanager
def job_lock(output: Path) -> Iterator[None]:
    """The job's lock (`_exclusive`), re-entrant in the process that holds it: `newsclip finetune` holds it from its
    first stage to its comparison, and the `run_stages` calls in between run under that hold."""
    key = output.resolve()
    if key in _HELD:
        yield
        return
    with _exclusive(output):
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)


def run_stages(cfg: JobConfig, names: tuple[str, ...] = STAGE_NAMES, force: bool = False) -> dict:
    """Run the stages in order, skipping any whose inputs are unchanged since it last committed (unless `force`).

    After a crash, the same command redoes only what had not been committed. The run's record (per stage: done
    or up to date, seconds, counts) goes to `runs/<run id>.json` as it goes and to `manifest.json` at the end.
    The console gets one line per stage; every message, and Ray's own logs, go to `logs/` (see console, ray_logs)."""
    stages = [_stage(name) for name in names]
    out = output_folder(cfg.output, "output_dir", make=False)
    _check_order(cfg, out, names)
    preflight(cfg, stages)  # what they need and would not get: before anything starts, all of it at once
    layout = cfg.layout
    output_folder(out, "output_dir")
    with job_lock(out), console.log_file(layout.log_file), ray_logs(layout.logs):
        _mark_interrupted(out)
        shutil.rmtree(layout.staging, ignore_errors=True)  # what a dead run left half-written: never committed
        resolved = dump(cfg)
        if not layout.resolved_config.exists() or layout.resolved_config.read_text() != resolved:
            write_text(layout.resolved_config, resolved)
        now = time.time()  # run ids sort in start order, also for runs in one second (a small night takes less)
        record = {"run_id": time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z-"
                  + uuid.uuid4().hex[:6],
                  "started_at": _now(), "status": "running", "stages": {},
                  # which code made these outputs (on a cluster: the submitted checkout's copy, in runtime_resources)
                  "newsclip": {"version": newsclip.__version__, "path": str(Path(newsclip.__file__).parent)}}
        path = layout.run_record(record["run_id"])
        running = None
        try:
            for stage in stages:
                running = stage.name
                record["stages"][stage.name] = _run_stage(cfg, stage, force)
                write_text(path, json.dumps(record, indent=2))
            record["status"] = "finished"
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            raise RunInterrupted(running) from None
        except BaseException as e:
            record["status"] = f"failed: {type(e).__name__}: {e}"
            raise
        finally:
            record["finished_at"] = _now()
            record["store_refs"] = store_refs(out, cfg.backbones)  # the store rows it leaves in use (store compact)
            write_text(path, json.dumps(record, indent=2))
            record_run(out, record)
    return record


def _run_stage(cfg: JobConfig, stage: Stage, force: bool) -> dict:
    out, name = cfg.output, stage.name
    completed = read_manifest(out).get("completed", {})
    key = stage_key(cfg, stage, completed)
    previous = completed.get(name, {})
    if not force and previous.get("key") == key and all((out / f).exists() for f in previous.get("files", [])):
        console.note(f"{name}: up to date")
        return {"status": "up to date"}
    with console.stage(name) as line:
        starting = time.time()
        if stage.starts_ray(cfg):  # the others start Ray when they use it (not for small work)
            ensure_ray(cfg.ray)
            for actor in stage.needs_of(cfg).actors:  # on a cluster that grows, it says what it waits for
                wait_for_resources(cfg.ray, actor.pool, actor.cpus, actor.gpus, actor.cpu_setting, actor.gpu_setting)
        started = time.time()  # Ray's start-up is not the stage's time (the line says it when it took a while)
        ray_start = f" (after {started - starting:.1f}s starting Ray)" if started - starting > 1 else ""
        record_completed(out, name, None)
        _reset_peak_rss()
        with stage_clock.running():  # each manifest entry the stage records gets its own seconds
            result = stage(cfg)
        entries = result if isinstance(result, list) else [result] if result else []
        _remove(out, record_completed(out, name, key, entries))  # what it committed before and no longer makes
        seconds = round(time.time() - started, 1)
        summary = _summary(entries)
        line.finish(f"done in {seconds}s{_counts(summary)}{ray_start}")
    return {"status": "done", "seconds": seconds, "driver_peak_rss_mb": _peak_rss_mb(), **summary}


def _check_order(cfg: JobConfig, out: Path, names: tuple[str, ...]) -> None:
    """Each stage reads what the stages before it commit: those this run does not run must have committed, unless
    they have no work in this job (a stage's `enabled`)."""
    completed = read_manifest(out).get("completed", {}) if out.is_dir() else {}
    for name in names:
        missing = [earlier for earlier in STAGE_NAMES[: STAGE_NAMES.index(name)]
                   if earlier not in names and _stage(earlier).works_in(cfg) and not (
                       earlier in completed and all((out / f).exists() for f in completed[earlier]["files"]))]
        if missing:
            raise StageOrderError(name, missing, out)


def _remove(out: Path, files: list[str]) -> None:
    """Delete files no longer current, and the folders that they leave empty (a backbone's embeddings)."""
    for relative in files:
        if Path(relative).is_absolute() or ".." in Path(relative).parts:  # the manifest names files under out only
            continue
        path = out / relative
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == out or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()


def _reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) afresh, so each stage records its own (Linux only)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> int | None:
    """This process's peak resident memory since the last reset, in MiB; None where /proc does not tell."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1]) // 1024
    return None


# the counts a stage's console line shows, those of them that it has and that are not 0
COUNT_LABELS = (("articles_in", "articles in"), ("queries", "queries"), ("candidates", "candidates"), ("rows", "rows"),
                ("new", "new"), ("encoded", "encoded"), ("reused", "reused"), ("rejected", "rejected"),
                ("skipped", "skipped"))


def _counts(summary: dict) -> str:
    """A stage's counts for its console line, e.g. `, 2000 rows, 1990 new, 10 reused`."""
    return "".join(f", {summary[key]} {label}" for key, label in COUNT_LABELS
                   if isinstance(summary.get(key), int) and summary[key])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _mark_interrupted(out: Path) -> None:
    """Run records still `running` when the lock was free belong to runs that died (driver killed, machine lost)."""
    for path in sorted(Layout(out).runs.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "running":
            record["status"] = "interrupted"
            write_text(path, json.dumps(record, indent=2))
