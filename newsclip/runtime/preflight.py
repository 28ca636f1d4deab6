"""Before a run's first stage: what its stages need that is not there (files, resources a local Ray never has)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from newsclip.config import JobConfig, RayConfig
from newsclip.runtime.ray_setup import may_grow, never_fits
from newsclip.runtime.stage import ActorRequest, Stage


class PreflightError(RuntimeError):
    """The job cannot run as configured: files are missing, or actors ask for more than the local Ray ever has."""


def preflight(cfg: JobConfig, stages: Iterable[Stage]) -> None:
    """Raise PreflightError naming everything `stages` need and would not get, before any of them runs.

    Without it, a missing weights file showed only when an actor loaded it, and an actor that asked for a GPU the
    machine lacks never started: Ray waited for one in silence, forever. On a cluster that may grow (an address is
    given) resources are checked as each pool starts instead (`ray_setup.wait_for_resources`)."""
    needs = [stage.needs_of(cfg) for stage in stages]
    problems = list(dict.fromkeys(message for need in needs for message in need.missing))
    actors = [actor for need in needs for actor in need.actors]
    if actors and not may_grow(cfg.ray):
        local = local_resources(cfg.ray, gpus=any(actor.gpus for actor in actors))
        short: dict[tuple[str, str], list[ActorRequest]] = {}  # by the settings that set them: one message each
        for actor in actors:
            if actor.cpus > local["CPU"] or actor.gpus > local["GPU"]:
                short.setdefault((actor.cpu_setting, actor.gpu_setting), []).append(actor)
        for (cpu_setting, gpu_setting), group in short.items():
            ask = {key: amount for key, amount in (("CPU", max(a.cpus for a in group)),
                                                   ("GPU", max(a.gpus for a in group))) if amount}
            up_to = len({(a.cpus, a.gpus) for a in group}) > 1
            problems.append(never_fits(", ".join(a.pool for a in group), ask, local, cpu_setting, gpu_setting, up_to))
    if problems:
        raise PreflightError("the job cannot run; nothing was started:\n  - " + "\n  - ".join(problems))


def local_resources(cfg: RayConfig, gpus: bool) -> dict[str, float]:
    """The CPUs and GPUs of the local Ray: the running one's, else what `ensure_ray` would start on this machine
    (`ray.num_cpus` or every CPU; the GPUs torch sees, as Ray counts them, looked up only when `gpus`)."""
    # started before (newsclip reuses it); not imported yet: not started, and importing Ray to ask costs a second
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        nodes = [node["Resources"] for node in sys.modules["ray"].nodes() if node.get("Alive")]
        return {key: max((node.get(key, 0.0) for node in nodes), default=0.0) for key in ("CPU", "GPU")}
    count = 0
    if gpus:
        import torch

        count = torch.cuda.device_count()
    return {"CPU": float(cfg.num_cpus or os.cpu_count() or 1), "GPU": float(count)}
