"""Shared fixtures: a private model cache, the test variant of demo-tiny, one local Ray per session."""

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports torch or starts Ray, so that Ray's workers inherit both.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["NEWSCLIP_CACHE"] = tempfile.mkdtemp(prefix="newsclip-test-cache-")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray with 2 CPUs for the whole session (the size of the CI machine)."""
    import ray

    from newsclip.config import RayConfig
    from newsclip.pipeline import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(RayConfig(num_cpus=2))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_tiny() -> Path:
    """The test variant of demo-tiny (TEST_STEPS of training), where `load_backbone("demo-tiny")` finds it."""
    from newsclip.backbones import cache_dir
    from newsclip.demo.model import TEST_STEPS, train_demo_model

    path = cache_dir() / "demo-tiny.pt"
    if not path.exists():
        train_demo_model(path, seed=0, steps=TEST_STEPS)
    return path
