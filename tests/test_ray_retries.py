"""The actor pools' bounds on restarts and task retries (ray.max_actor_restarts, ray.max_task_retries) reach the
actors: Ray Data's own default is to restart and retry forever (see newsclip.runtime.ray_setup.map_actors)."""

import warnings
from pathlib import Path

import pytest

from newsclip import config
from newsclip.config import RayConfig
from newsclip.runtime import ray_setup
from newsclip.yaml_config import ConfigError

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _load(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text("input: {articles: a, images: i}\n" + text)  # a job file names its input
    return config.load(path)


def test_retry_keys_load_and_validate(tmp_path):
    assert RayConfig().max_actor_restarts == 3 and RayConfig().max_task_retries == 10
    nightly = config.load(JOBS / "nightly.yaml").ray
    assert (nightly.max_actor_restarts, nightly.max_task_retries) == (3, 10)
    ray_cfg = _load(tmp_path, "ray:\n  max_actor_restarts: 2\n  max_task_retries: 0\n").ray
    assert (ray_cfg.max_actor_restarts, ray_cfg.max_task_retries) == (2, 0)
    assert config.load(None, ["ray.max_task_retries=5"]).ray.max_task_retries == 5
    assert ray_setup.actor_retries(ray_cfg) == {"max_restarts": 2, "max_task_retries": 0}
    for text, message in [
        ("ray:\n  max_actor_restarts: -1\n", "ray.max_actor_restarts: must not be negative"),  # -1: forever
        ("ray:\n  max_task_retries: -1\n", "ray.max_task_retries: must not be negative"),
        ("ray:\n  max_task_retries: many\n", "ray.max_task_retries: expected int"),
        ("ray:\n  max_restarts: 2\n", "ray.max_restarts: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _load(tmp_path, text)


def _report_class():
    """A UDF that reports, from inside each actor, its id and the max_task_retries its creation gave it (made in a
    function, so that Ray pickles it by value: the workers cannot import this test module)."""

    class Report:
        def __call__(self, batch):
            import ray

            context = ray.get_runtime_context()
            rows = len(batch["id"])
            return {"actor_id": [context.get_actor_id()] * rows,
                    "max_task_retries": [context.current_actor._ray_max_task_retries] * rows}

    return Report


def test_bounds_reach_the_actors(ray_local, tmp_path):
    """A pool made by map_actors, the stages' helper, runs actors that GCS will restart at most max_actor_restarts
    times and whose tasks are retried at most max_task_retries times; and it warns of no deprecation."""
    import ray
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import ActorTableData
    from ray.util.annotations import RayDeprecationWarning

    # neither the defaults (3) nor Ray Data's (-1), and not equal, so that a swap shows
    ray_cfg = _load(tmp_path, "ray:\n  max_actor_restarts: 2\n  max_task_retries: 1\n").ray
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)  # e.g. if map_batches_internal starts to warn
        ds = ray_setup.map_actors(ray.data.range(4, override_num_blocks=2), ray_cfg, _report_class(), batch_size=2,
                                  compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
        rows = ds.take_all()
    assert len(rows) == 4
    assert {r["max_task_retries"] for r in rows} == {1}
    actors = {r["actor_id"] for r in rows}
    assert len(actors) == 1
    for actor in actors:
        info = ActorTableData.FromString(state.get_actor_info(ray.ActorID.from_hex(actor)))
        assert info.max_restarts == 2


@pytest.fixture
def ray_data_drops_the_bounds(monkeypatch):
    """What an upgrade could do silently: Ray Data's actor pool operator overrides whatever bounds it is given."""
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    original = ActorPoolMapOperator._apply_default_remote_args

    def forever(ray_remote_args, data_context):
        return {**original(ray_remote_args, data_context), "max_restarts": -1, "max_task_retries": -1}

    ray_setup._check_retry_bounds.cache_clear()
    monkeypatch.setattr(ActorPoolMapOperator, "_apply_default_remote_args", staticmethod(forever))
    yield
    ray_setup._check_retry_bounds.cache_clear()


def test_the_guard_fails_loudly_when_the_bounds_are_dropped(ray_local, ray_data_drops_the_bounds):
    import ray

    bounds = RayConfig(max_actor_restarts=2, max_task_retries=1)
    with pytest.raises(RuntimeError, match=r"not the configured \{'max_restarts': 2, 'max_task_retries': 1\}"):
        ray_setup.map_actors(ray.data.range(1), bounds, _report_class(), batch_size=1,
                             compute=ray.data.ActorPoolStrategy(size=1))
    with pytest.raises(RuntimeError, match="max_restarts': -1"):  # at job start too: the runner's ensure_ray
        ray_setup.ensure_ray(bounds)


def test_the_guard_passes_and_is_checked_once(ray_local):
    ray_setup._check_retry_bounds.cache_clear()
    ray_setup.check_retry_bounds(RayConfig(max_actor_restarts=0, max_task_retries=0))
    ray_setup.check_retry_bounds(RayConfig(max_actor_restarts=0, max_task_retries=0))
    assert ray_setup._check_retry_bounds.cache_info().hits == 1
