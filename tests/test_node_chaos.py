"""Chaos on a cluster of several nodes: the demo job, submitted with `ray job submit` to a head and two worker nodes
on this machine (tests/node_cluster.py), loses a worker node (its raylet and every Ray worker on it, SIGKILLed at
once) in the middle of the encode stage, or of the translate stage, and finishes with the embeddings, translations
and rankings of an undisturbed run; a head killed in the middle of encode takes the job with it, and the job
submitted again to a new head reuses what was committed. The same cluster answers the test of `ray job submit`
itself (the shipped package, one run per submission id) on the node-kill run.

Cheap by design (the suite's budget is tight): one cluster and one undisturbed run serve every test; the
undisturbed run is the demo job run in this process (its 200 articles are under `ray.inline_rows`: no Ray, the
same bits as the pools, which tests/test_nightly.py checks) while the cluster starts; the disturbed runs use the
pools (`ray.inline_rows=0`) and start from what the undisturbed run committed before the stage they disturb, as a
rerun of the job would (see `_seed`). The worker-node kill mid-encode always runs; the other two run with
NEWSCLIP_NODE_CHAOS=all (measured times in the README, "When a node dies").
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from node_cluster import LocalCluster

from newsclip.cli import main
from newsclip.demo.data import write_demo_data
from newsclip.runtime.store import read_embeddings

pytestmark = pytest.mark.slow  # whole jobs on a cluster: `pytest -m 'not slow'` leaves them out
every_kill = pytest.mark.skipif(os.environ.get("NEWSCLIP_NODE_CHAOS") != "all",
                                reason="NEWSCLIP_NODE_CHAOS=all runs it (40-60 s more each on 2 cores)")

REPO = Path(__file__).resolve().parents[1]
ARTICLES = 200  # 197 queries and 197 candidate images, 34 of the articles German
WORKERS, WORKER_CPUS = 2, 2  # one worker node can die and the other takes its work
BATCH, COMMIT_ROWS = 16, 48
SIDES = {"texts": "article_id", "images": "image_id"}
SHIPPED = ["newsclip", "jobs", "pyproject.toml", "README.md"]  # what a clean checkout needs to run a job
POOLS = "ray.inline_rows=0"  # a disturbed run's work goes to Ray's actor pools and tasks, whatever its size
IMAGE_ENCODER = "ray::MapWorker(MapBatches(ImageEncoder))"  # how Ray titles the image side's model actor
TRANSLATOR = "ray::MapWorker(MapBatches(Translator))"


class Setup:
    """The cluster, a clean checkout to submit from, the shared folder (`root`) and the undisturbed run in it."""

    def __init__(self, root: Path, cluster: LocalCluster, checkout: Path):
        self.root, self.cluster, self.checkout = root, cluster, checkout
        self.timings: dict[str, float] = {}

    def overrides(self, name: str, *extra: str) -> list[str]:
        data = self.root / "data"
        return [f"input.articles={data / 'articles'}", f"input.images={data / 'images'}",
                f"output_dir={self.root / name}", "eval.sample_size=null", "eval.bootstrap=20",
                f"encode.batch_size={BATCH}", f"encode.commit_rows={COMMIT_ROWS}",
                # as on GPU nodes: the model actor holds a CPU, so it runs on a worker node, never on the head
                "encode.num_cpus_per_actor=1",
                # the undisturbed run's translation cache; a run that must translate names its own
                f"translate.cache_dir={self.root / 'reference' / 'translation-cache'}", *extra]

    def submit(self, name: str, *extra: str) -> str:
        """`ray job submit` of the demo job as the README has it (`--no-wait`: the job's status comes from the job
        server, which is cheaper than the command following its logs); returns the submission id."""
        submission_id = f"{name}-{uuid.uuid4().hex[:6]}"
        command = ["job", "submit", "--no-wait", "--address", self.cluster.address, "--working-dir", ".",
                   "--runtime-env", "jobs/runtime_env.yaml", "--submission-id", submission_id,
                   "--", "newsclip", "run", "jobs/demo.yaml", *(f"--set={o}" for o in self.overrides(name, *extra))]
        done = self.cluster.ray(*command, cwd=self.checkout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return submission_id

    def status(self, submission_id: str) -> str:
        return self.cluster.get(f"/api/jobs/{submission_id}")["status"]

    def finish(self, submission_id: str, timeout: float = 400) -> None:
        """Until the job ends; it must have succeeded."""
        deadline = time.time() + timeout
        while (status := self.status(submission_id)) in ("PENDING", "RUNNING") and time.time() < deadline:
            time.sleep(0.2)
        logs = self.cluster.get(f"/api/jobs/{submission_id}/logs")["logs"]
        (self.root / f"{submission_id}.log").write_text(logs)
        assert status == "SUCCEEDED", f"{submission_id}: {status}\n{logs[-5000:]}"

    def workers(self, n: int) -> None:
        """At least `n` live worker nodes: a replacement for a killed one joins, as the autoscaler or KubeRay would
        bring one."""
        for _ in range(n - len(self.cluster.workers)):
            self.cluster.add_worker(WORKER_CPUS)
        self.cluster.wait_for_nodes(1 + len(self.cluster.workers))


def clean_checkout(target: Path) -> Path:
    """What `git clone` would give: the package, job files and metadata, no venv, caches or data."""
    target.mkdir(parents=True)
    for name in SHIPPED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    # where this session's demo-tiny and demo translator live (a cluster sets NEWSCLIP_CACHE likewise)
    runtime_env = yaml.safe_load((target / "jobs" / "runtime_env.yaml").read_text())
    runtime_env.setdefault("env_vars", {})["NEWSCLIP_CACHE"] = os.environ["NEWSCLIP_CACHE"]
    (target / "jobs" / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_tiny, packages_dir):
    """A head and two worker nodes, the demo data on the shared folder, and the undisturbed run."""
    root = tmp_path_factory.mktemp("node-chaos")  # every node of this machine sees it: the shared folder
    started = time.time()
    cluster = LocalCluster()
    setup = Setup(root, cluster, clean_checkout(root / "checkout"))
    failed: list[BaseException] = []

    def start_cluster():
        try:
            cluster.start(WORKERS, WORKER_CPUS)
        except BaseException as e:
            failed.append(e)
        setup.timings["cluster start"] = time.time() - started

    starting = threading.Thread(target=start_cluster)
    starting.start()  # the nodes start while this process runs the undisturbed job
    try:
        write_demo_data(root / "data", ARTICLES, seed=7)
        assert main(["run", str(REPO / "jobs" / "demo.yaml"), *(f"--set={o}" for o in setup.overrides("reference"))
                     ]) == 0
        setup.timings["reference run"] = time.time() - started
        starting.join()
        if failed:
            raise failed[0]
        yield setup
    finally:
        starting.join()
        cluster.stop()
        print("node chaos timings (s):", {k: round(v, 1) for k, v in setup.timings.items()})


# ------------------------------------------------------------------------------------------------ helpers
def _seed(setup: Setup, name: str, stages: tuple[str, ...], store_sides: tuple[str, ...] = ()) -> None:
    """Start `name`'s output folder with what the undisturbed run committed for `stages` (their files, rejects and
    manifest entries) and the `store_sides` of its embedding store, as a rerun of the job would find them: the
    runner skips those stages (their keys are unchanged) and encode reuses those rows, so the run's time goes to
    the part the test disturbs."""
    reference, output = setup.root / "reference", setup.root / name
    manifest = json.loads((reference / "manifest.json").read_text())
    for stage in stages:
        for relative in [*manifest["completed"][stage]["files"], f"rejects/{stage}.parquet"]:
            if (reference / relative).exists():
                (output / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(reference / relative, output / relative)
    for side in store_sides:
        for folder in (reference / "store").glob(f"*/*/{side}"):
            shutil.copytree(folder, output / folder.relative_to(reference))
    seeded = {"completed": {s: manifest["completed"][s] for s in stages},
              "stages": {s: manifest["stages"][s] for s in stages}, "runs": []}
    (output / "manifest.json").write_text(json.dumps(seeded, indent=2, sort_keys=True))


def _embeddings(output: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for side, id_name in SIDES.items():
        ids, vectors = read_embeddings(output / "embeddings" / "demo-tiny" / side, id_name)
        assert len(set(ids)) == len(ids), f"{side}: an id appears twice"
        out[side] = dict(zip(ids, vectors))
    return out


def _assert_same_as_reference(setup: Setup, name: str) -> None:
    """Every id once, each embedding bit for bit the undisturbed run's; the same translations, rankings, metrics."""
    output, reference = setup.root / name, setup.root / "reference"
    got, want = _embeddings(output), _embeddings(reference)
    for side, vectors in want.items():
        assert got[side].keys() == vectors.keys(), side
        assert all(np.array_equal(got[side][i], v) for i, v in vectors.items()), side
    for relative in ["rankings/demo-tiny.tsv", "rankings/demo-tiny.image_to_text.tsv", "metrics.csv"]:
        assert (output / relative).read_text() == (reference / relative).read_text(), relative
    for relative in ["rankings/demo-tiny.parquet", "translated/part-00000.parquet"]:
        assert pq.read_table(output / relative).equals(pq.read_table(reference / relative)), relative


def _texts_committed(output: Path) -> bool:
    return (output / "embeddings" / "demo-tiny" / "texts").is_dir()


def _completed(output: Path) -> set[str]:
    return set(json.loads((output / "manifest.json").read_text())["completed"])


def _wait_for(setup: Setup, submission_id: str, what: str, condition, timeout: float = 300) -> None:
    deadline = checked = time.time()
    deadline += timeout
    while not condition():
        if time.time() > checked + 1:  # the job server, once a second
            assert setup.status(submission_id) in ("PENDING", "RUNNING"), f"the job ended before {what}"
            checked = time.time()
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _node_running(setup: Setup, title: str):
    """The worker node one of whose processes is the Ray worker titled `title`, if any."""
    return next((node for node in setup.cluster.workers if node.pids_titled(title)), None)


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _kill_mid_batch(setup: Setup, submission_id: str, what: str, actor: str, before) -> None:
    """Once `before()` holds and the actor titled `actor` is up on a worker node, kill that node while the actor
    works on a batch (Ray titles it `<actor>.submit` then; it loads its model under `<actor>.__init__` first, which
    here takes seconds, and then encodes or translates this job's rows in about one)."""
    _wait_for(setup, submission_id, what, lambda: before() and _node_running(setup, actor))
    node = _node_running(setup, actor)
    pid = node.pids_titled(actor)[0]
    deadline = time.time() + 300
    while not _title(pid).endswith(".submit"):  # one small file, read every 5 ms: the window is about a second
        assert _title(pid).startswith(actor), f"the {what} actor went away before it took a batch"
        assert time.time() < deadline, f"the {what} actor took no batch in 300 s"
        time.sleep(0.005)
    assert setup.cluster.kill(node)


# -------------------------------------------------------------------------------------------------- tests
def test_worker_node_killed_mid_encode(setup):
    started = time.time()
    name = "encode-node-kill"
    output = setup.root / name
    setup.workers(WORKERS)
    # prepare, translate and the text side's rows as committed by the undisturbed run: this run does the images
    _seed(setup, name, ("prepare", "translate"), store_sides=("texts",))
    submission = setup.submit(name, POOLS)
    # the middle of encode: the text side committed, the image side's model actor at work on a worker node
    _kill_mid_batch(setup, submission, "image encoding", IMAGE_ENCODER, lambda: _texts_committed(output))
    setup.timings[f"{name}: until the kill"] = time.time() - started
    assert not (output / "embeddings" / "demo-tiny" / "images").exists() and "encode" not in _completed(output)
    setup.finish(submission)
    _assert_same_as_reference(setup, name)
    images = json.loads((output / "manifest.json").read_text())["stages"]["encode:demo-tiny:images"]
    assert images["encoded"] == images["rows"] and images["reused"] == 0  # a store of its own: each row once
    assert not images.get("in_process")
    setup.timings[name] = time.time() - started

    # `ray job submit` as the README has it: the job ran the checkout's copy of the package (shipped in its
    # runtime env, not the one installed beside the cluster's Python) and found demo-tiny through the runtime env's
    # NEWSCLIP_CACHE; `ray job status` reports it; a second submission under the same id is refused, which keeps a
    # retried nightly run from running twice
    run = json.loads(next((output / "runs").glob("*.json")).read_text())
    assert "runtime_resources" in run["newsclip"]["path"] and not run["newsclip"]["path"].startswith(str(REPO))
    status = setup.cluster.ray("job", "status", "--address", setup.cluster.address, submission)
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr
    again = setup.cluster.ray("job", "submit", "--no-wait", "--address", setup.cluster.address, "--submission-id",
                              submission, "--", "true", cwd=setup.checkout)
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr


@every_kill
def test_worker_node_killed_mid_translate(setup):
    started = time.time()
    name = "translate-node-kill"
    output = setup.root / name
    setup.workers(WORKERS)
    _seed(setup, name, ("prepare",))
    # a translation cache of its own (nothing cached), and the undisturbed run's embedding store (encode reuses
    # every row: this run's time goes to translate)
    cache, store = output / "translation-cache", setup.root / "reference" / "store"
    submission = setup.submit(name, POOLS, f"translate.cache_dir={cache}", f"store_dir={store}")
    # the middle of translate: its actor at work on a worker node, nothing committed
    _kill_mid_batch(setup, submission, "translation", TRANSLATOR, lambda: True)
    setup.timings[f"{name}: until the kill"] = time.time() - started
    assert not (output / "translated").exists() and "translate" not in _completed(output)
    setup.finish(submission)
    _assert_same_as_reference(setup, name)
    setup.timings[name] = time.time() - started


@every_kill
def test_head_killed_mid_encode_then_submitted_again(setup):
    started = time.time()
    name = "head-kill"
    output = setup.root / name
    cluster = setup.cluster
    setup.workers(1)
    _seed(setup, name, ("prepare", "translate"))
    submission = setup.submit(name, POOLS)
    # the middle of encode: the text side committed (rows in the store, embeddings/texts), the image side not
    _wait_for(setup, submission, "the text side's commit", lambda: _texts_committed(output))
    setup.timings[f"{name}: until the kill"] = time.time() - started
    assert cluster.kill(cluster.head)  # the GCS, the job server, the job's supervisor and its driver, at once
    assert "encode" not in _completed(output) and not (output / "metrics.csv").exists()
    # A head that comes back is a new cluster (no GCS fault tolerance here): the old workers cannot join it and go
    # too. One worker is enough for the rest of the job.
    for node in list(cluster.workers):
        cluster.kill(node)
    cluster.start(1, WORKER_CPUS)
    setup.timings[f"{name}: a new cluster"] = time.time() - started
    setup.finish(setup.submit(name, POOLS))
    _assert_same_as_reference(setup, name)
    first, second = (json.loads(p.read_text()) for p in sorted((output / "runs").glob("*.json")))
    assert first["status"] == "interrupted" and second["status"] == "finished"
    assert {second["stages"][s]["status"] for s in ("prepare", "translate")} == {"up to date"}
    stages = json.loads((output / "manifest.json").read_text())["stages"]
    texts, images = stages["encode:demo-tiny:texts"], stages["encode:demo-tiny:images"]
    # the text side, committed to the store before the kill, is reused; the image side is encoded after it
    assert texts["reused"] == texts["rows"] and texts["encoded"] == 0
    assert images["encoded"] + images["reused"] == images["rows"] and images["encoded"] > 0
    setup.timings[name] = time.time() - started
