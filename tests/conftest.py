"""Shared fixtures: a private model cache, the test builds of demo-tiny and the demo translator (made in background
processes while the tests that need neither run), one local Ray per session."""

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from newsclip.translate.demo_translator import PACKAGE_FILENAME

# Before anything imports torch or starts Ray, so that Ray's workers inherit both.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["NEWSCLIP_CACHE"] = tempfile.mkdtemp(prefix="newsclip-test-cache-")

REPO = Path(__file__).resolve().parents[1]

# The test build of demo-tiny: TEST_STEPS of training (see newsclip/demo/model.py for what it scores).
# The test build of the demo translator trains 250 steps on 40,000 pairs with 2 threads instead of the real 400
# on 100,000 (the suite must stay short). Measured on this 2-core machine, seed 0: 499/500 held-out sentences
# exact (0.998) and 29/40 held-out 4-sentence bodies (0.725; one held-out filler the short run gets wrong recurs
# in many bodies); the build takes ~90 s. The real build: 500/500 and 100/100 for seeds 0, 1 and 2.
TEST_TRANSLATOR = {"steps": 250, "n_pairs": 40_000, "threads": 2}
BUILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


class Build:
    """A model the session's tests share, made by a background process that starts when collection ends, so that
    its ~1-1.5 minutes of training overlap the tests that need no model (they run first: see ordering below)."""

    def __init__(self, name: str, fixture: str, code: str, target: Path, sources: tuple[str, ...]):
        self.name, self.fixture, self.code, self.target = name, fixture, code, target
        self.process: subprocess.Popen | None = None
        self.built = self._kept(sources) or target  # where the build writes
        self.log = self.built.parent / f"{self.built.name}.build.log"

    def _kept(self, sources: tuple[str, ...]) -> Path | None:
        """With NEWSCLIP_TEST_BUILDS=DIR (for repeated local runs; CI leaves it unset): the build is kept in DIR
        under a digest of its code and of the package folders it comes from, and reused while they are unchanged."""
        if not (keep := os.environ.get("NEWSCLIP_TEST_BUILDS")):
            return None
        digest = hashlib.sha256(self.code.encode())
        for folder in sources:
            for path in sorted((REPO / folder).rglob("*.py")):
                digest.update(path.read_bytes())
        return Path(keep).expanduser().resolve() / f"{self.fixture}-{digest.hexdigest()[:16]}" / self.target.name

    def start(self) -> None:
        if self.process is None and not self.built.exists():
            self.built.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "w") as log:
                # at the tests' own priority: the builds are the suite's critical path. At nice 19 the modules
                # before them ran faster (72-119 s instead of 124-260), but the first tests that needed a build then
                # waited 50-60 s for each (clean-clone CI runs, measured)
                self.process = subprocess.Popen([sys.executable, "-c", self.code, str(self.built)],
                                                env={**os.environ, **BUILD_ENV}, stdout=log, stderr=subprocess.STDOUT)

    def wait(self) -> Path:
        """The built file, once its process has ended (started now if collection did not start it)."""
        self.start()
        if self.process is not None:
            started = time.perf_counter()
            code = self.process.wait()
            waited = time.perf_counter() - started
            if waited > 1:
                print(f"\n{self.name}: waited {waited:.0f} s for its background build")
            if code != 0 or not self.built.exists():
                raise RuntimeError(f"building {self.name} failed (exit {code}):\n{self.log.read_text()[-3000:]}")
        if not self.target.exists():  # a kept build: linked where the tests' jobs look
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.target.symlink_to(self.built)
        return self.target


def _cache() -> Path:
    return Path(os.environ["NEWSCLIP_CACHE"])


BUILDS = {
    # where `load_backbone("demo-tiny")` finds it
    "demo_tiny": Build("demo-tiny", "demo_tiny", (
        "import sys; from pathlib import Path; from newsclip.demo.model import TEST_STEPS, train_demo_model; "
        "train_demo_model(Path(sys.argv[1]), seed=0, steps=TEST_STEPS, log=print)"), _cache() / "demo-tiny.pt",
        ("newsclip/demo",)),
    "demo_package": Build("the demo translator", "demo_package", (
        "import sys; from pathlib import Path; from newsclip.translate.demo_translator import build_demo_translator; "
        f"build_demo_translator(Path(sys.argv[1]).parent, seed=0, **{TEST_TRANSLATOR!r})"),
        _cache() / "demo-translator" / PACKAGE_FILENAME, ("newsclip/translate",)),
}


def _needs(item: pytest.Item) -> set[str]:
    return set(BUILDS) & set(getattr(item, "fixturenames", ()))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: a test that needs a built model is `slow`
def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly on a machine without a GPU; a test that needs a built model is marked
    `slow`; modules whose tests need no built model run first, then those that need demo-tiny only (each module's
    tests stay together and in order, so module fixtures are set up once)."""
    import torch

    for item in items:
        if _needs(item):
            item.add_marker(pytest.mark.slow)

    if os.environ.get("NEWSCLIP_LONG_TESTS") != "1":
        skip_long = pytest.mark.skip(reason="marked `long`: NEWSCLIP_LONG_TESTS=1 runs it (no room in CI's limit)")
        for item in items:
            if "long" in item.keywords:
                item.add_marker(skip_long)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    # modules that need no build, then those that need demo-tiny only (its build ends first), then the translator's
    waits: dict[str, int] = {}
    for item in items:
        needs = _needs(item)
        rank = 2 if "demo_package" in needs else 1 if needs else 0
        waits[item.module.__name__] = max(waits.get(item.module.__name__, 0), rank)
    items.sort(key=lambda item: waits[item.module.__name__])  # stable: the order within each group is kept


def pytest_collection_finish(session):
    """Start the background builds the collected tests need (none for a run that needs no model)."""
    needed = set().union(*(_needs(item) for item in session.items)) if session.items else set()
    for name in needed:
        BUILDS[name].start()


def pytest_sessionfinish(session, exitstatus):
    for build in BUILDS.values():
        if build.process is not None and build.process.poll() is None:
            build.process.kill()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray with 2 CPUs for the whole session (the size of the CI machine)."""
    import ray

    from newsclip.config import RayConfig
    from newsclip.runtime.ray_setup import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(RayConfig(num_cpus=2))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_tiny() -> Path:
    """The test variant of demo-tiny (TEST_STEPS of training), where `load_backbone("demo-tiny")` finds it."""
    return BUILDS["demo_tiny"].wait()


@pytest.fixture(scope="session")
def demo_package() -> Path:
    """The test build of the demo de->en `.argosmodel` (TEST_TRANSLATOR)."""
    return BUILDS["demo_package"].wait()


@pytest.fixture(scope="session")
def packages_dir(demo_package) -> Path:
    """The demo package installed where jobs look by default ($NEWSCLIP_CACHE/argos-packages)."""
    from newsclip.retrieval.backbones import cache_dir
    from newsclip.translate.packages import install_packages

    target = cache_dir() / "argos-packages"
    install_packages([demo_package.parent], target)  # a folder of .argosmodel files
    return target
