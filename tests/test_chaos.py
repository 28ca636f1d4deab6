"""Chaos: an encode actor's process killed mid-stage costs a retry, not the job; a driver killed mid-encode and
rerun finishes the job, redoing only what was not committed. Either way every id appears exactly once and the
embeddings equal an undisturbed run's, bit for bit."""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from newsclip.cli import main
from newsclip.demo.data import write_demo_data
from newsclip.runtime.store import read_embeddings

pytestmark = pytest.mark.slow  # a whole job: `pytest -m 'not slow'` leaves it out

ARTICLES = 300  # 6 store parts of 48 images a side: a kill after the first leaves work to redo
SIDES = {"texts": "article_id", "images": "image_id"}


def _job(root: Path, name: str, pools: bool = True) -> Path:
    """The job file of one run; `pools`: its work on Ray's tasks and actor pools however small (the undisturbed
    reference runs in this process instead: the same bits, which tests/test_nightly.py checks, in seconds)."""
    data = root / "data"
    job = {"name": name, "input": {"articles": str(data / "articles"), "images": str(data / "images")},
           "output_dir": str(root / name), "translate": {"enabled": False},
           "eval": {"sample_size": None, "candidates": "all", "bootstrap": 20},
           # small batches and commits: many tasks in flight and several store parts before the kill
           "encode": {"batch_size": 16, "commit_rows": 48}, "ray": {"num_cpus": 2, "inline_rows": 0 if pools else 1000}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _embeddings(output: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for side, id_name in SIDES.items():
        ids, vectors = read_embeddings(output / "embeddings" / "demo-tiny" / side, id_name)
        assert len(set(ids)) == len(ids), f"{side}: an id appears twice"
        out[side] = dict(zip(ids, vectors))
    return out


def _assert_same(output: Path, reference: dict) -> None:
    got = _embeddings(output)
    for side, vectors in reference.items():
        assert got[side].keys() == vectors.keys()
        assert all(np.array_equal(got[side][i], v) for i, v in vectors.items())


def _image_store_parts(output: Path) -> list[str]:
    return glob.glob(str(output / "store" / "demo-tiny" / "*" / "images" / "part-*.parquet"))


@pytest.fixture(scope="module")
def chaos_root(tmp_path_factory, demo_tiny, ray_local):
    root = tmp_path_factory.mktemp("chaos")
    write_demo_data(root / "data", ARTICLES, seed=5)
    assert main(["run", str(_job(root, "reference", pools=False))]) == 0
    return root, _embeddings(root / "reference")


def _encoder_pids(name: str) -> list[int]:
    """Processes of Ray actors running `name` (Ray titles them `ray::MapWorker(MapBatches(<name>)).<method>`)."""
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmdline = Path(path).read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(f"ray::MapWorker(MapBatches({name}))"):
            pids.append(int(path.split("/")[2]))
    return pids


def test_killed_encode_actor_costs_a_retry_not_the_job(chaos_root):
    root, reference = chaos_root
    job = _job(root, "actor-kill")
    assert main(["prepare", str(job)]) == 0
    killed: list[int] = []

    def kill_once_busy():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = _encoder_pids("ImageEncoder")
            if pids and _image_store_parts(root / "actor-kill"):  # mid-stage: parts committed, more to come
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_once_busy)
    watcher.start()
    assert main(["encode", str(job)]) == 0
    watcher.join()
    assert killed, "the encode stage finished before its actor could be killed"
    _assert_same(root / "actor-kill", reference)


def test_killed_driver_then_rerun_finishes_the_job(chaos_root):
    root, reference = chaos_root
    job = _job(root, "driver-kill")
    output = root / "driver-kill"
    command = [sys.executable, "-m", "newsclip.cli", "run", str(job)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's would be
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while driver.poll() is None and not _image_store_parts(output) and time.time() < deadline:
        time.sleep(0.02)
    assert driver.poll() is None, "the run ended before the driver could be killed"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    stored_before = len(_image_store_parts(output))
    assert not (output / "metrics.csv").exists()

    assert main(["run", str(job)]) == 0  # the rerun, in this process on the session's Ray (no second Ray to start)
    manifest = json.loads((output / "manifest.json").read_text())
    first, second = (json.loads(p.read_text()) for p in sorted((output / "runs").glob("*.json")))
    assert first["status"] == "interrupted" and second["status"] == "finished"
    assert second["stages"]["prepare"]["status"] == "up to date"  # committed before the kill: not redone
    images = manifest["stages"]["encode:demo-tiny:images"]
    assert images["reused"] >= stored_before * 48 > 0 and 0 < images["encoded"] < images["rows"]
    _assert_same(output, reference)
    assert (output / "metrics.csv").read_text() == (root / "reference" / "metrics.csv").read_text()
    assert not list((output / ".staging").glob("*"))  # the dead run's half-written stage was cleared
