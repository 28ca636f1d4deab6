"""A Ray cluster of several nodes on one machine, for tests that kill nodes: a head and workers, each started by
`ray start --block` as this test's own child with its own ports, resources and `--temp-dir`, so that one node's
processes (its raylet, agents and workers, and on the head the GCS, the job server and the job drivers) can be
killed at once, the way a machine dies. Modelled on Ray's own chaos tests (`ray._private.test_utils.RayletKiller`,
`ray.cluster_utils.Cluster.remove_node(allow_graceful=False)`), which kill a node's raylet ungracefully.

Never `ray stop`: it kills every Ray process on the machine, other people's clusters included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent

# How fast the GCS declares a node dead whose raylet stopped answering: here in about 1.5 s, for speed. Until then a
# batch in flight on an actor of that node is retried against the dead actor, and each try counts against
# ray.max_task_retries: about 2 tries here, about 7 with Ray's defaults (a check every 3 s, dead after 5 misses),
# which is why the cluster manifests run jobs with ray.max_task_retries=10 (README, "When a node dies").
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Node:
    name: str
    temp_dir: Path
    process: subprocess.Popen
    log: object
    num_cpus: int = 0
    seen: dict[int, float] = field(default_factory=dict)  # pid -> start time of each process seen in its tree

    def processes(self) -> list[psutil.Process]:
        """This node's live processes: `ray start` and everything it started (raylet, agents, Ray workers, and on
        the head the GCS, dashboard, job supervisors and the drivers they run), plus any of them seen before that
        lost their parent (the same pid and start time: never a reused pid, someone else's process)."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            if self.process.poll() is not None:  # reaped: its pid may be anyone's now
                raise psutil.NoSuchProcess(self.process.pid)
            root = psutil.Process(self.process.pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        for pid, started in self.seen.items():
            with contextlib.suppress(psutil.Error):
                if pid not in found and (process := psutil.Process(pid)).create_time() == started:
                    found[pid] = process
        for pid, process in list(found.items()):
            try:
                self.seen.setdefault(pid, process.create_time())
            except psutil.Error:
                del found[pid]
        return [p for p in found.values() if _alive(p)]

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once: a machine that died, not a node that was drained."""
        victims = self.processes()
        for process in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(victims, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        return [p.pid for p in victims]

    def stop(self) -> None:
        """SIGTERM `ray start --block` (it takes its processes down), then SIGKILL whatever is left of them."""
        processes = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
        _, left = psutil.wait_procs([p for p in processes if p.pid != self.process.pid], timeout=5)
        for process in [*left, *self.processes()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.log.close()

    def pids_titled(self, prefix: str) -> list[int]:
        """This node's Ray workers whose title starts with `prefix` (Ray titles an actor `ray::<class>.<method>`,
        a Ray Data map actor `ray::MapWorker(MapBatches(<class>))...`)."""
        out = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                if " ".join(process.cmdline()).startswith(prefix):
                    out.append(process.pid)
        return out


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LocalCluster:
    """A head (`num_cpus` 0 as in cluster/: it runs the job server and the drivers) and worker nodes, in a short
    folder under /tmp (Ray's unix socket paths must stay under ~107 characters), with a token of its own."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="ncnodes-", dir="/tmp"))
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        token = self.root / "auth-token"
        token.write_text(self.token)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            # Ray 2.60 turns token auth on when ~/.ray/auth_token exists; pin it, with a token of our own
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now, not after a 30 s drain
            **FAST_FAILURE_DETECTION,
        })
        self.env = env
        self.head: Node | None = None
        self.workers: list[Node] = []
        self.dead: list[Node] = []  # killed: stopped again at the end, in case anything of theirs survived
        self.gcs_port = self.dashboard_port = 0
        self._count = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def nodes(self) -> list[Node]:
        return [n for n in [self.head, *self.workers] if n is not None]

    def _start(self, name: str, args: list[str]) -> Node:
        self._count += 1
        temp_dir = self.root / f"{name}{self._count}"  # a new folder per start: a restarted node is a new node
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
        log = open(self.root / f"{temp_dir.name}.log", "w")  # noqa: SIM115 -- the node writes to it until it stops
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
             "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
             "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
             "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
             "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return Node(name, temp_dir, process, log)

    def start(self, workers: int, num_cpus: int) -> None:
        """A head, then `workers` worker nodes of `num_cpus` CPUs each, until the GCS counts them all. (Workers
        started with the head, on a busy machine, timed out waiting for their raylet to register.)"""
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        self.head = self._start("head", [
            "--head", "--port", str(self.gcs_port), "--num-cpus", "0", "--num-gpus", "0",
            "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(client)])
        self.wait_for_nodes(1)
        for _ in range(workers):
            self.add_worker(num_cpus)
        self.wait_for_nodes(1 + workers)

    def add_worker(self, num_cpus: int, object_store_mb: int = 200) -> Node:
        """A worker node joins (does not wait for it)."""
        node = self._start("worker", [
            "--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--object-store-memory", str(object_store_mb * 2**20)])
        node.num_cpus = num_cpus
        self.workers.append(node)
        return node

    def get(self, path: str) -> dict:
        """GET the dashboard's HTTP API, with the token."""
        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout: float = 180) -> None:
        """Until the GCS counts `n` live nodes. A worker whose `ray start` gave up (its raylet did not register
        within Ray's 30 s, which happens on a loaded machine) is started again."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(OSError, KeyError, ValueError):
                if len(self.alive_nodes()) == n:
                    return
            for node in self.nodes:
                if node.process.poll() is not None:
                    if node is self.head:
                        raise RuntimeError(f"the head exited:\n{self.node_log(node)[-3000:]}")
                    node.stop()
                    self.workers.remove(node)
                    self.add_worker(node.num_cpus)
            time.sleep(0.3)
        raise TimeoutError(f"not {n} live nodes after {timeout} s")

    def node_log(self, node: Node) -> str:
        return (self.root / f"{node.temp_dir.name}.log").read_text(errors="replace")

    def kill(self, node: Node) -> list[int]:
        pids = node.kill()
        if node is self.head:
            self.head = None
        else:
            self.workers.remove(node)
        self.dead.append(node)
        return pids

    def ray(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        """Every node, workers first; then any process still naming this cluster's folder (there should be none)."""
        for node in [*self.workers, *([self.head] if self.head else []), *self.dead]:
            node.stop()
        self.workers, self.head = [], None
        deadline = time.time() + 10
        while (left := own_processes(str(self.root))) and time.time() < deadline:
            time.sleep(0.3)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def own_processes(marker: str) -> list[int]:
    """Pids of processes whose command line names `marker` (this cluster's unique temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]
