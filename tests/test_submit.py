"""`ray job submit` against a real local Ray head: the demo job from a clean copy of the checkout, then its outputs.

The head runs as this test's own child (`ray start --head --block`, its own ports, temp dir and auth token) and
is stopped by terminating that child. Not `ray stop`: it kills every Ray process on the machine, including the
session's local Ray (conftest's `ray_local`) and anyone else's.
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import polars as pl
import pytest
import yaml
from node_cluster import own_processes

pytestmark = pytest.mark.slow  # a whole job: `pytest -m 'not slow'` leaves it out

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHIPPED = ["newsclip", "jobs", "pyproject.toml", "README.md"]  # what a clean checkout needs to run a job


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Head:
    def __init__(self, root: Path, dashboard_port: int, env: dict[str, str], process: subprocess.Popen):
        self.root, self.env, self.process = root, env, process
        self.address = f"http://127.0.0.1:{dashboard_port}"

    def ray(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture
def ray_head(demo_tiny):
    # Ray's unix socket paths must stay under ~107 characters: a short folder directly in /tmp
    root = Path(tempfile.mkdtemp(prefix="ncray-", dir="/tmp"))
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(9)
    token = root / "auth-token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "NEWSCLIP_CACHE": os.environ["NEWSCLIP_CACHE"],
        # Ray 2.60 turns token auth on when ~/.ray/auth_token exists; pin it, with a token of our own
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now, not after a 30 s drain
    })
    log = open(root / "head.log", "w")  # noqa: SIM115 -- the head process writes to it until teardown
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--temp-dir", str(root / "ray"), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
         "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
         "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(root, dashboard, env, process)
    try:
        deadline = time.time() + 60
        while True:  # the job server answers (401 without the token is an answer) once the dashboard is up
            try:
                urllib.request.urlopen(f"{head.address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Ray head did not start:\n{(root / 'head.log').read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield head
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # --block: the head takes its GCS, raylet and workers down with it
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the process group this test created
                process.wait(timeout=10)
        deadline = time.time() + 15
        while (left := own_processes(str(root))) and time.time() < deadline:
            time.sleep(0.5)
        for pid in own_processes(str(root)):  # stragglers of this head only (their command line names its dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert not left or not own_processes(str(root)), f"Ray processes left behind: {left}"


def clean_checkout(target: Path) -> Path:
    """What `git clone` would give: the package, job files and metadata, no venv, caches or data."""
    target.mkdir(parents=True)
    for name in SHIPPED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    return target


@pytest.mark.slow
def test_ray_job_submit_demo_job(tmp_path, ray_head):
    from newsclip.config import JobConfig
    from newsclip.demo.data import write_demo_data

    data = tmp_path / "data"
    write_demo_data(data, 100, seed=3)
    checkout = clean_checkout(tmp_path / "checkout")
    # the README's runtime_env plus where this session's demo-tiny lives (a cluster sets NEWSCLIP_CACHE likewise)
    runtime_env = yaml.safe_load((checkout / "jobs" / "runtime_env.yaml").read_text())
    runtime_env.setdefault("env_vars", {})["NEWSCLIP_CACHE"] = os.environ["NEWSCLIP_CACHE"]
    (checkout / "jobs" / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    submit = ["job", "submit", "--address", ray_head.address, "--working-dir", ".",
              "--runtime-env", "jobs/runtime_env.yaml"]

    # 1. the job runs the shipped copy of the package, not the one installed next to the cluster's Python
    code = "import os, newsclip; print('AT', newsclip.__file__); print('CACHE', os.environ['NEWSCLIP_CACHE'])"
    probe = ray_head.ray(*submit, "--", "python", "-c", code, cwd=checkout, timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    at = next(line.split(" ", 1)[1] for line in probe.stdout.splitlines() if line.startswith("AT "))
    assert "runtime_resources" in at and not at.startswith(str(REPO)), at
    assert f"CACHE {os.environ['NEWSCLIP_CACHE']}" in probe.stdout

    # 2. the demo job, as the README submits it, on 100 articles
    output = tmp_path / "output"
    overrides = [f"input.articles={data / 'articles'}", f"input.images={data / 'images'}",
                 f"output_dir={output}", "eval.sample_size=null", "ray.inline_rows=0"]  # actor pools on the cluster
    if "translate" in {f.name for f in dataclasses.fields(JobConfig)}:
        overrides.append("translate.enabled=false")  # the Argos stage has its own tests; this one is about Ray jobs
    submission_id = f"newsclip-demo-{uuid.uuid4().hex[:8]}"
    started = time.time()
    job = ray_head.ray(*submit, "--submission-id", submission_id, "--", "newsclip", "run", "jobs/demo.yaml",
                       *(f"--set={o}" for o in overrides), cwd=checkout, timeout=240)
    assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-5000:]
    status = ray_head.ray("job", "status", "--address", ray_head.address, submission_id)
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr
    # the same submission id again is refused: what keeps a retried nightly run from running twice
    again = ray_head.ray(*submit, "--submission-id", submission_id, "--no-wait", "--", "true", cwd=checkout)
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr

    metrics = pl.read_csv(output / "metrics.csv")
    overall = metrics.filter((pl.col("backbone") == "demo-tiny") & (pl.col("source") == "all"))
    if "direction" in metrics.columns:  # text->image is the task's ranking (rankings/*.tsv)
        overall = overall.filter(pl.col("direction") == "text_to_image")
    assert overall.height == 1 and 80 <= overall["n"].item() <= 100
    assert 0 < overall["mrr"].item() <= 1
    lines = (output / "rankings" / "demo-tiny.tsv").read_text().splitlines()
    assert len(lines) == overall["n"].item() and all(len(line.split("\t")) >= 2 for line in lines)
    stages = json.loads((output / "manifest.json").read_text())["stages"]
    assert {"prepare", "encode", "knn", "evaluate", "report"} <= {name.split(":")[0] for name in stages}
    assert (output / "report.md").exists()
    print(f"ray job submit: demo job took {time.time() - started:.0f}s")


def _load_submit_script():
    spec = importlib.util.spec_from_file_location("newsclip_jobs_submit", REPO / "jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_copies_committed_files_manifest_last(tmp_path, monkeypatch):
    submit = _load_submit_script()
    output = tmp_path / "output"
    for relative in ["metrics.csv", "manifest.json", "rankings/demo-tiny.tsv", "embeddings/x/texts/part-0.parquet",
                     ".staging/half-written/part-0.parquet", "rankings/.demo-tiny.tsv.1234.tmp"]:
        (output / relative).parent.mkdir(parents=True, exist_ok=True)
        (output / relative).write_text(relative)
    copied = submit.publish(output, f"file://{tmp_path / 'published'}")
    assert copied[-1] == "manifest.json"
    assert sorted(copied) == ["embeddings/x/texts/part-0.parquet", "manifest.json", "metrics.csv",
                              "rankings/demo-tiny.tsv"]
    assert (tmp_path / "published" / "rankings" / "demo-tiny.tsv").read_text() == "rankings/demo-tiny.tsv"
    assert not (tmp_path / "published" / ".staging").exists()
    monkeypatch.chdir(tmp_path)
    assert len(submit.publish(output, "plain/relative/path")) == 4  # a plain path works too
    assert (tmp_path / "plain" / "relative" / "path" / "metrics.csv").exists()
