"""Ray for the stages: connect or start it, keep its logs in the run's log folder (off the console), bound actor
restarts and task retries, and tables as datasets."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from newsclip.config import RayConfig
from newsclip.runtime import console

# OpenMP's default spin-wait made 2-thread torch erratic on small machines (0.2 s to 5 s a step, measured on 2 cores).
# openai-clip 1.0.1 imports pkg_resources, which warns on every import in every worker: noise, not news (the one
# warning newsclip filters rather than avoids: it is in the clip package's own import, see the README).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore:pkg_resources is deprecated:UserWarning"}

RAY_LOGGERS = ("ray", "ray.data")  # the driver's Python loggers Ray writes to (ray.data does not propagate to ray)
RAY_LOG = "ray.log"  # their records, in the run's log folder
NATIVE_STDERR_LOG = "ray-native.log"  # what native code (Ray's C++ core worker) writes to the driver's stderr
SESSION_LINK = "ray-session"  # -> the local Ray session's own logs (workers' stdout/stderr, raylet, GCS)

_session_dir: str | None = None  # the Ray session this process started or joined
_routing: _Routing | None = None  # while a run routes Ray's logs


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), else start a local Ray; reuse a running session.

    Workers' output reaches this console only with --verbose (`log_to_driver`); during a run Ray's own logs go to
    the run's log folder (see `ray_logs`)."""
    import ray

    global _session_dir
    if _routing:
        import ray.data  # it sets up the ray.data logger (and drops its handlers): before the run takes them

        _routing.route_loggers()
        _routing.redirect_native_stderr()  # before the core worker starts in this process, if it has not yet
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        log_to_driver = console.is_verbose()
        if address:  # a submitted job brings its runtime_env with it
            context = ray.init(address=address, log_to_driver=log_to_driver)
        else:
            context = ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                               runtime_env={"env_vars": WORKER_ENV})
        _session_dir = getattr(context, "address_info", {}).get("session_dir")
    if _routing:
        _routing.ray_in_use()


def actor_retries(cfg: RayConfig) -> dict:
    """Ray remote args for the stages' actor pools: bounded restarts and task retries (see RayConfig).

    Ray Data's default is to restart an actor and retry its tasks forever. Ray 2.60 takes these bounds only as
    remote args, and deprecates both ways `Dataset.map_batches` takes those (`ray_remote_args_fn` and
    `**ray_remote_args`, to be removed in 2.64) without a named parameter to replace them yet (`ActorPoolStrategy`
    and `DataContext` have none either); `Dataset.map_batches_internal`, the DeveloperAPI that Ray's own batch-LLM
    stages pass remote args through for the same reason, takes them as they are:
    `ds.map_batches_internal(Cls, ..., **actor_retries(cfg.ray))`. It skips map_batches' check that a GPU map sets
    a batch_size; the stages always set one."""
    return {"max_restarts": cfg.max_actor_restarts, "max_task_retries": cfg.max_task_retries}


def dataset_of(table, blocks: int):
    """A Ray dataset of a driver-side Arrow table in `blocks` slices, so that the actors share the work."""
    import ray

    step = max(1, -(-len(table) // blocks))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)])


@contextlib.contextmanager
def ray_logs(folder: Path) -> Iterator[Path]:
    """While a run lasts, Ray's logs go to `folder` and not to the console (with --verbose: to both).

    - `ray.log`: the driver's `ray` and `ray.data` loggers (start-up, Ray Data's execution plans and progress);
    - `ray-native.log`: what Ray's C++ core worker writes to the driver's stderr (e.g. its error, for every actor
      pool, that an actor whose constructor arguments live in the object store may not be restartable);
    - `ray-session`: a link to the local Ray session's log folder (every worker's stdout and stderr).

    Ray Data's progress bars are off (each stage has its own line). Nothing is created before Ray is used, so a
    rerun with nothing to do changes no file."""
    global _routing
    if _routing is not None:  # a run inside a run (never in the CLI): the outer one routes
        yield folder
        return
    _routing = _Routing(folder, console.is_verbose())
    try:
        _routing.route_loggers()
        yield folder
    finally:
        routing, _routing = _routing, None
        routing.undo()


class _Routing:
    """Where a run sends Ray's logs, and what it changed to do so (undone when the run ends)."""

    def __init__(self, folder: Path, verbose: bool) -> None:
        self.folder = folder
        self.verbose = verbose
        self.handler = _LazyFileHandler(folder / RAY_LOG)
        self.handler.setLevel(logging.INFO)
        # Ray's own format (ray.init sets it on every handler of the `ray` logger anyway)
        self.handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- "
                                                    "%(message)s"))
        self.removed: list[tuple[logging.Logger, logging.Handler]] = []
        self.data_context: dict | None = None
        self.native: tuple[int, object, object] | None = None  # (saved fd 2, sys.stderr before, sys.stderr during)

    def route_loggers(self) -> None:
        """Ray's loggers write to ray.log; their console handlers come off unless --verbose. Again after each step
        that may reset them (importing ray or ray.data, ray.init)."""
        for name in RAY_LOGGERS:
            logger = logging.getLogger(name)
            if self.handler not in logger.handlers:
                logger.addHandler(self.handler)
            if self.verbose:
                continue
            for handler in list(logger.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
                    self.removed.append((logger, handler))

    def ray_in_use(self) -> None:
        """Ray is up: its loggers again, Ray Data's progress bars off, the session's logs linked."""
        self.route_loggers()
        if not self.verbose and self.data_context is None:
            from ray.data import DataContext

            context = DataContext.get_current()
            self.data_context = {"enable_progress_bars": context.enable_progress_bars}
            context.enable_progress_bars = False
        self.link_session_logs()

    def redirect_native_stderr(self) -> None:
        """File descriptor 2 to ray-native.log, so that what native code writes there stays off the console; Python's
        own stderr (this console, warnings, tracebacks) keeps the terminal through a copy of the descriptor."""
        if self.verbose or self.native is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        sys.stderr.flush()
        saved = os.dup(2)
        before = during = sys.stderr
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if sys.stderr.fileno() == 2:  # else it is not fd 2 (pytest's capture): it stays as it is
                during = os.fdopen(os.dup(saved), "w", buffering=1, encoding=sys.stderr.encoding,
                                   errors=sys.stderr.errors)
        target = os.open(self.folder / NATIVE_STDERR_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, 2)
        os.close(target)
        sys.stderr = during
        self.native = (saved, before, during)

    def link_session_logs(self) -> None:
        if not _session_dir or not Path(_session_dir, "logs").is_dir():
            return  # a remote cluster's session: its logs are on its nodes
        self.folder.mkdir(parents=True, exist_ok=True)
        link = self.folder / SESSION_LINK
        if link.is_symlink() and os.readlink(link) == str(Path(_session_dir, "logs")):
            return
        temporary = self.folder / f".{SESSION_LINK}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(Path(_session_dir, "logs"), target_is_directory=True)
        temporary.replace(link)

    def undo(self) -> None:
        if self.native is not None:
            saved, before, during = self.native
            if sys.stderr is during:
                sys.stderr = before
            if during is not before:
                during.close()
            os.dup2(saved, 2)
            os.close(saved)
        if self.data_context is not None and "ray.data" in sys.modules:
            from ray.data import DataContext

            for key, value in self.data_context.items():
                setattr(DataContext.get_current(), key, value)
        for name in RAY_LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        for logger, handler in self.removed:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        self.handler.close()


class _LazyFileHandler(logging.FileHandler):
    """A file handler that makes its folder and file only when a record comes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()
