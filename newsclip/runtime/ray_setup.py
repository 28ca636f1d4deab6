"""Ray for the stages: connect or start it, keep its logs in the run's log folder (off the console), bound actor
restarts and task retries, and tables as datasets."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
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
    the run's log folder (see `ray_logs`). Fails if actor pools would not get `cfg`'s retry bounds (`map_actors`)."""
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
    check_retry_bounds(cfg)  # at job start, before any actor pool: see map_actors
    if _routing:
        _routing.ray_in_use()


def may_grow(cfg: RayConfig) -> bool:
    """Whether the job runs on a cluster that may gain nodes (an address is given), not on a local Ray it starts."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


class ResourcesUnavailableError(RuntimeError):
    """An actor pool asks for more than any node of the Ray cluster has, and no such node came."""


WAIT_POLL_SECONDS = 2.0  # how often a waiting pool looks at the cluster's nodes again
_asked: list[dict[str, float]] = []  # the bundles waiting pools ask the autoscaler for (backbones wait side by side)
_asked_lock = threading.Lock()


def wait_for_resources(cfg: RayConfig, pool: str, cpus: float, gpus: float, cpu_setting: str, gpu_setting: str
                       ) -> None:
    """Return once some node of the cluster could hold one actor of `pool` (`cpus` and `gpus` each); Ray must be up.

    Ray itself waits in silence for a node that fits (and a local Ray never gets one). On a local Ray this raises
    ResourcesUnavailableError at once; on a cluster that may grow it says on the console what the pool waits for,
    asks the autoscaler for such a node (a wait that only watched would never make one come), and raises after
    `cfg.wait_timeout_s`. Each error names the settings to change."""
    ask = {key: amount for key, amount in (("CPU", cpus), ("GPU", gpus)) if amount}
    largest = _largest_node(ask)
    if largest is None:
        return
    if not may_grow(cfg):
        raise ResourcesUnavailableError(never_fits(pool, ask, largest, cpu_setting, gpu_setting))
    wanted = f"{_amounts(ask)} per actor"
    started = time.monotonic()
    console.warn(f"{pool}: waiting for {wanted} (the largest node has {_amounts(largest, ask)}; "
                 f"ray.wait_timeout_s={cfg.wait_timeout_s:g})")
    with _asking(ask):
        while (largest := _largest_node(ask)) is not None:
            left = cfg.wait_timeout_s - (time.monotonic() - started)
            if left <= 0:
                raise ResourcesUnavailableError(
                    f"{pool}: no node of the Ray cluster offered {wanted} within ray.wait_timeout_s="
                    f"{cfg.wait_timeout_s:g} seconds (the largest node has {_amounts(largest, ask)}); add such nodes "
                    f"(or let the autoscaler add them), {_lower_settings(ask, largest, cpu_setting, gpu_setting)}, "
                    "or raise ray.wait_timeout_s")
            time.sleep(min(WAIT_POLL_SECONDS, left))
    console.log(f"{pool}: a node for its actors is there, after {time.monotonic() - started:.0f}s")


def never_fits(pool: str, ask: dict[str, float], local: dict[str, float], cpu_setting: str, gpu_setting: str,
               up_to: bool = False) -> str:
    """The error for a pool (or pools, their largest `ask`: `up_to`) whose actors ask for more than the local Ray has
    (`local`), which never grows."""
    return (f"{pool}: each actor asks for {'up to ' if up_to else ''}{_amounts(ask)}, which the local Ray can never "
            f"give (it has "
            f"{_amounts(local, ask)}); {_lower_settings(ask, local, cpu_setting, gpu_setting)}, or give ray.address "
            f"of a cluster that has it")


def _lower_settings(ask: dict[str, float], largest: dict[str, float], cpu_setting: str, gpu_setting: str) -> str:
    """What to lower, for an error: the settings of the resources that no node has enough of."""
    short = [key for key in ("GPU", "CPU") if ask.get(key, 0) > largest.get(key, 0)] or list(ask)
    settings = " or ".join({"GPU": gpu_setting, "CPU": cpu_setting}[key] for key in short)
    return f"lower {settings}" + (f" (--set {gpu_setting}=0 runs it on CPUs)" if "GPU" in short else "")


def _largest_node(ask: dict[str, float]) -> dict[str, float] | None:
    """None when a live node has every resource of `ask`; else the most a node has of each (for the message)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(key, 0.0) >= amount for key, amount in ask.items()) for node in nodes):
        return None
    return {key: max((node.get(key, 0.0) for node in nodes), default=0.0) for key in ("CPU", "GPU")}


def _amounts(resources: dict[str, float], keys=None) -> str:
    """e.g. `1 GPU and 1 CPU`, `0 GPUs`, for the keys of `keys` (default: all)."""
    return " and ".join(f"{resources[key]:g} {key}{'' if resources[key] == 1 else 's'}" for key in ("GPU", "CPU")
                        if key in (keys or resources))


@contextlib.contextmanager
def _asking(bundle: dict[str, float]) -> Iterator[None]:
    """The autoscaler is asked for a node that holds `bundle` while this lasts (with the other waiting pools')."""
    from ray.autoscaler.sdk import request_resources

    with _asked_lock:
        _asked.append(bundle)
        request_resources(bundles=list(_asked))
    try:
        yield
    finally:
        with _asked_lock:
            _asked.remove(bundle)
            request_resources(bundles=list(_asked))  # the pool's own actors ask from now on


def actor_retries(cfg: RayConfig) -> dict:
    """The remote args that bound an actor pool's restarts and task retries (see RayConfig and `map_actors`)."""
    return {"max_restarts": cfg.max_actor_restarts, "max_task_retries": cfg.max_task_retries}


def map_actors(ds, cfg: RayConfig, fn, **kwargs):
    """`ds.map_batches(fn, **kwargs)` on an actor pool whose actors Ray restarts at most `cfg.max_actor_restarts`
    times and whose batches it retries at most `cfg.max_task_retries` times (Ray Data's default: forever).

    Ray 2.60 has no supported, non-deprecated way to give a map_batches actor pool these bounds:
    - `Dataset.map_batches` takes them only as `**ray_remote_args` or from `ray_remote_args_fn`, both deprecated
      ("will be removed in Ray 2.64", ray/data/dataset.py:215-241, :896-897); the named remote parameters it
      recommends instead (label_selector, fallback_strategy, max_calls, resources, accelerator_type, runtime_env,
      dataset.py:634-660) include neither;
    - `ActorPoolStrategy` (ray/data/_internal/compute.py:109) sizes the pool only, and `DataContext`
      (ray/data/context.py:661) bounds UDF errors and constructor deaths, not restarts of a live actor;
    - `ActorPoolMapOperator._apply_default_remote_args` (ray/data/_internal/execution/operators/
      actor_pool_map_operator.py:632-648) sets `max_restarts=-1` and `max_task_retries=-1` unless the remote
      args already hold them.
    So this passes them through `Dataset.map_batches_internal` (dataset.py:937, a DeveloperAPI without the
    deprecation warnings, the path Ray's own batch-LLM processor takes: ray/llm/_internal/batch/processor/
    base.py:286). That path is not a promise, so `check_retry_bounds` plans a probe pool through this same call
    before the first pool starts (and `ensure_ray` at job start): if an upgrade drops the bounds on the way to
    the actors, the job fails there, loudly, instead of retrying forever. (It also skips map_batches' check that
    a GPU map sets a batch_size; the stages always set one.)"""
    check_retry_bounds(cfg)
    # the stage's own keys, e.g. encode.num_gpus_per_actor (encode's per-backbone values resolve into that one)
    stage = console.running_stage() or "<stage>"
    wait_for_resources(cfg, f"{stage} {getattr(fn, '__name__', fn)}", kwargs.get("num_cpus") or 0.0,
                       kwargs.get("num_gpus") or 0.0, f"{stage}.num_cpus_per_actor", f"{stage}.num_gpus_per_actor")
    return _map_actors(ds, cfg, fn, **kwargs)


def _map_actors(ds, cfg: RayConfig, fn, **kwargs):
    return ds.map_batches_internal(fn, **kwargs, **actor_retries(cfg))


def check_retry_bounds(cfg: RayConfig) -> None:
    """Raise RuntimeError unless an actor pool built by `map_actors` would start its actors with `cfg`'s bounds.

    It plans (does not run) a one-actor probe with Ray Data's own planner and reads the remote args the pool's
    operator creates each actor with (`_merge_ray_remote_args`, what `_start_actor` passes to `.options`), and
    the options of its actor tasks (a per-call `max_task_retries` there would override the actor's). Once per
    process and bounds; Ray must be up. It reads Ray Data internals: on a Ray where they moved, it fails too
    (see `map_actors`: check there what now carries the bounds, then update this)."""
    _check_retry_bounds(cfg.max_actor_restarts, cfg.max_task_retries)


@functools.cache
def _check_retry_bounds(max_restarts: int, max_task_retries: int) -> None:
    import ray

    wanted = {"max_restarts": max_restarts, "max_task_retries": max_task_retries}
    try:
        import ray.data
        from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
        from ray.data._internal.logical.optimizers import get_execution_plan

        probe = _map_actors(ray.data.range(1), RayConfig(max_actor_restarts=max_restarts,
                                                         max_task_retries=max_task_retries),
                            _Probe, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
        plan, _ = get_execution_plan(probe._logical_plan)
        ops, todo = [], [plan.dag]
        while todo:
            op = todo.pop()
            ops.append(op)
            todo.extend(op.input_dependencies)
        pools = [op for op in ops if isinstance(op, ActorPoolMapOperator)]
        if not pools:
            raise LookupError(f"no ActorPoolMapOperator in the probe's plan: {[type(op).__name__ for op in ops]}")
        actor_args = pools[0]._merge_ray_remote_args()
        got = {key: actor_args.get(key) for key in wanted}
        per_call = pools[0]._ray_actor_task_remote_args.get("max_task_retries", max_task_retries)
    except Exception as e:
        raise RuntimeError(f"newsclip cannot check that its actor pools' retry bounds reach the actors on Ray "
                           f"{ray.__version__} ({type(e).__name__}: {e}); see newsclip.runtime.ray_setup.map_actors"
                           ) from e
    if got != wanted or per_call != max_task_retries:
        raise RuntimeError(f"Ray {ray.__version__} would start newsclip's actor pools with {got} (per task: "
                           f"max_task_retries={per_call}), not the configured {wanted}: map_actors no longer bounds "
                           "restarts and retries (Ray Data's default is forever); see "
                           "newsclip.runtime.ray_setup.map_actors")


class _Probe:
    """The probe pool's UDF (never run)."""

    def __call__(self, batch):
        return batch


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
        self.printer: tuple[object, object] | None = None  # (Ray's worker module, its error printer)

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
        self.route_cluster_errors()
        self.link_session_logs()

    def route_cluster_errors(self) -> None:
        """The errors the cluster sends this driver ("(raylet) A worker died or was killed ...") go to ray.log:
        Ray prints them to stdout itself, whatever `log_to_driver` says, from a thread that calls
        `ray._private.worker.print_to_stdstream` by name. A dead worker is Ray's to retry (ray.max_task_retries);
        when retries run out, the stage's own error says so."""
        if self.verbose or self.printer is not None:
            return
        from ray._private import worker

        printer = getattr(worker, "print_to_stdstream", None)
        if printer is None:  # a Ray that prints them another way: they stay on the console
            return
        ray_logger = logging.getLogger("ray")

        def to_log(data, ignore_prefix=False):
            for line in data.get("lines", ()):
                ray_logger.warning("(%s) %s", data.get("pid", "ray"), line)

        self.printer = (worker, printer)
        worker.print_to_stdstream = to_log

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
        if self.printer is not None:
            module, printer = self.printer
            module.print_to_stdstream = printer
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
