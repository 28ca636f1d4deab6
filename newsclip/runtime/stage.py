"""A stage as the runner sees it: its work behind one door, and what it declares it reads and needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from newsclip.config import JobConfig


@dataclass(frozen=True)
class ActorRequest:
    """What each actor of a pool that a stage starts asks Ray for, and the config keys that set it."""

    pool: str  # what the pool is, e.g. "encode RN50"
    cpus: float
    gpus: float
    cpu_setting: str  # e.g. "encode.num_cpus_per_actor"
    gpu_setting: str  # e.g. "encode.num_gpus_per_actor", or a per-backbone key where that sets it


@dataclass(frozen=True)
class Needs:
    """What a stage needs before it can run: files (each missing one a message that says what, where it was looked
    for and how to get it) and the actor pools it may start."""

    missing: tuple[str, ...] = ()
    actors: tuple[ActorRequest, ...] = ()


@dataclass(frozen=True)
class Stage:
    """A stage: `work(cfg)` does it (calling the stage runs it), the rest is what the runner asks before it does.

    - `external_inputs(cfg)`: what identifies the stage's inputs outside `output_dir` (a change there reruns it);
    - `sections`: the config sections its work depends on; None: the whole config less `ray`;
    - `needs_ray(cfg)`: whether the runner must start Ray for it (stages that use Ray only for large work start it
      themselves);
    - `needs(cfg)`: the files and actor pools the runner checks before the first stage of a run (`preflight`);
    - `enabled(cfg)`: whether the stage has work in this job at all (a later stage run alone then needs its output)."""

    name: str
    work: Callable[[JobConfig], object]
    external_inputs: Callable[[JobConfig], object] | None = None
    sections: tuple[str, ...] | None = None
    needs_ray: Callable[[JobConfig], bool] | None = None
    needs: Callable[[JobConfig], Needs] | None = None
    enabled: Callable[[JobConfig], bool] | None = None

    def __call__(self, cfg: JobConfig) -> object:
        return self.work(cfg)

    def inputs_outside(self, cfg: JobConfig) -> object:
        return self.external_inputs(cfg) if self.external_inputs else None

    def starts_ray(self, cfg: JobConfig) -> bool:
        return bool(self.needs_ray and self.needs_ray(cfg))

    def works_in(self, cfg: JobConfig) -> bool:
        return self.enabled(cfg) if self.enabled else True

    def needs_of(self, cfg: JobConfig) -> Needs:
        return self.needs(cfg) if self.needs else Needs()
