"""Ray for the stages: connect or start it, bound actor restarts and task retries, and tables as datasets."""

from __future__ import annotations

import os

from newsclip.config import RayConfig

# OpenMP's default spin-wait made 2-thread torch erratic on small machines (0.2 s to 5 s a step): see MEASURED.
# openai-clip 1.0.1 imports pkg_resources, which warns on every import in every worker: noise, not news.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore:pkg_resources is deprecated:UserWarning"}


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


def dataset_of(table, blocks: int):
    """A Ray dataset of a driver-side Arrow table in `blocks` slices, so that the actors share the work."""
    import ray

    step = max(1, -(-len(table) // blocks))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)])
