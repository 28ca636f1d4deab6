"""The job: stages in order, each reading the previous stage's committed output; Ray started on demand."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from newsclip import config as config_mod
from newsclip.config import JobConfig, RayConfig
from newsclip.store import write_text

STAGE_NAMES = ("prepare", "translate", "encode", "knn", "evaluate", "report")

# OpenMP's default spin-wait made 2-thread torch erratic on small machines (0.2 s to 5 s a step): see MEASURED.
# openai-clip 1.0.1 imports pkg_resources, which warns on every import in every worker: noise, not news.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore:pkg_resources is deprecated:UserWarning"}


def log(message: str) -> None:
    print(f"[newsclip {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), else start a local Ray; reuse a running session."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # a submitted job brings its runtime_env with it
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})


def actor_retries(cfg: RayConfig) -> dict:
    """Ray remote args for the stages' actor pools: bounded restarts and task retries (see RayConfig)."""
    return {"max_restarts": cfg.max_actor_restarts, "max_task_retries": cfg.max_task_retries}


def _stage(name: str) -> Callable[[JobConfig], object]:
    # imported per stage: the prepare stage needs no torch, the report stage no Ray
    if name == "prepare":
        from newsclip.prepare import run
    elif name == "translate":
        from newsclip.translate.job import run
    elif name == "encode":
        from newsclip.encode import run
    elif name == "knn":
        from newsclip.rank import run
    elif name == "evaluate":
        from newsclip.evaluate import run
    elif name == "report":
        from newsclip.report import run
    else:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    return run


def run_stages(cfg: JobConfig, names: tuple[str, ...] = STAGE_NAMES) -> None:
    cfg.output.mkdir(parents=True, exist_ok=True)
    write_text(cfg.output / "config.resolved.yaml", config_mod.dump(cfg))
    for name in names:
        if name in ("translate", "encode") or (name == "knn" and cfg.knn.backend == "ray"):
            ensure_ray(cfg.ray)
        started = time.time()
        log(f"{name}: started")
        _stage(name)(cfg)
        log(f"{name}: done in {time.time() - started:.1f}s")
