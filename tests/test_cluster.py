"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests' fields and the files they name."""

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE_HOME = "/home/ray/newsclip"  # where cluster/Dockerfile puts the checkout inside the image
MOUNT = "/mnt/newsclip"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> dict[str, list[dict]]:
    return {p.name: documents(p) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))}


def by_kind(kind: str) -> list[dict]:
    return [d for docs in manifests().values() for d in docs if d["kind"] == kind]


def repo_file(path_in_image: str) -> Path:
    assert path_in_image.startswith(IMAGE_HOME + "/"), path_in_image
    return REPO / path_in_image.removeprefix(IMAGE_HOME + "/")


def entrypoint_job_file(entrypoint: str) -> tuple[Path, list[str]]:
    """The job file and `--set` overrides of a `newsclip run FILE --set ...` entrypoint."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["newsclip", "run"], entrypoint
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    return repo_file(words[2]), overrides


# ------------------------------------------------------------------------------------------- cluster launcher
def test_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own checks on top, with provider defaults

    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head runs drivers only
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # a CPU instance
    (gpu,) = workers
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]  # autoscaling from zero
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance
    assert any(f"{MOUNT}:{MOUNT}" in option for option in config["docker"]["run_options"])
    assert any(MOUNT in command for command in config["initialization_commands"])


def test_launcher_schema_rejects_a_typo():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_worker"] = 8  # not a key
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


# ------------------------------------------------------------------------------------------------- kubernetes
def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
    elif doc["kind"] == "RayJob":
        spec = doc["spec"].get("rayClusterSpec")
        if spec is None:
            return []
    elif doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    else:
        return []
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_every_manifest_has_the_required_fields():
    kinds = {}
    for name, docs in manifests().items():
        assert docs, name
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), (name, doc.get("kind"))
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]
            kinds.setdefault(doc["kind"], []).append(doc)
            if doc["apiVersion"].startswith("ray.io/"):
                assert doc["apiVersion"] == "ray.io/v1"
            for pod in _pod_specs(doc):
                volumes = {v["name"] for v in pod.get("volumes", [])}
                for container in pod["containers"]:
                    assert container["name"] and container["image"]
                    assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, (name, container["name"])
    assert {"RayCluster", "RayJob", "CronJob", "ConfigMap", "PersistentVolumeClaim"} <= set(kinds)


def test_ray_clusters_cpu_head_autoscaling_gpu_workers():
    import ray

    specs = [d["spec"] for d in by_kind("RayCluster")] + [d["spec"]["rayClusterSpec"] for d in by_kind("RayJob")
                                                           if "rayClusterSpec" in d["spec"]]
    assert len(specs) == 2
    claims = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    for spec in specs:
        assert spec["rayVersion"] == ray.__version__  # the image's Ray is the one the manifests announce
        assert spec["enableInTreeAutoscaling"] is True
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        (gpu,) = spec["workerGroupSpecs"]
        assert gpu["minReplicas"] == 0 <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > 0
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for pod in [head["template"]["spec"], gpu["template"]["spec"]]:
            assert MOUNT in {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                    if "persistentVolumeClaim" in v} <= claims
    (pvc,) = by_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod writes output_dir


def test_rayjob_for_the_comparison_runs_an_existing_job_file():
    from newsclip import config

    (job,) = [d for d in by_kind("RayJob") if d["metadata"]["name"] == "newsclip-newsimages2022"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and "rayClusterSpec" in spec
    yaml.safe_load(spec["runtimeEnvYAML"])
    job_file, overrides = entrypoint_job_file(spec["entrypoint"])
    assert job_file == REPO / "jobs" / "newsimages2022.yaml" and job_file.is_file()
    cfg = config.load(job_file, overrides)  # the entrypoint's overrides are valid keys for that job file
    assert cfg.output_dir.startswith(MOUNT) and cfg.input.articles.startswith(MOUNT)
    assert len(cfg.backbones) == 9


def test_nightly_schedule_creates_one_rayjob_per_date():
    from newsclip import config

    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents(CLUSTER / "kuberay" / "nightly.yaml")}
    cron = docs["CronJob", "newsclip-nightly"]["spec"]
    assert len(cron["schedule"].split()) == 5 and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert ("ServiceAccount", pod["serviceAccountName"]) in docs
    role = docs["Role", "newsclip-nightly"]
    assert {"create", "get"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["rayjobs"]
    binding = docs["RoleBinding", "newsclip-nightly"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    configmap = docs["ConfigMap", pod["volumes"][0]["configMap"]["name"]]
    container = pod["containers"][0]
    script = container["command"][-1]
    assert script.startswith("/config/") and Path(script).name in configmap["data"]

    rayjob = yaml.safe_load(configmap["data"]["rayjob.yaml"].replace("@DATE@", "20260102"))
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"] == rayjob["spec"]["jobId"] == "newsclip-nightly-20260102"
    (cluster,) = by_kind("RayCluster")
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    job_file, overrides = entrypoint_job_file(rayjob["spec"]["entrypoint"])
    assert job_file == REPO / "jobs" / "nightly.yaml" and job_file.is_file()
    assert config.load(job_file, overrides).output_dir.startswith(MOUNT)


@pytest.mark.skipif(sys.platform != "linux", reason="GNU/busybox date")
def test_nightly_script_is_idempotent_per_scheduled_night(tmp_path):
    """Run the CronJob's script with a stand-in kubectl: a retried night creates nothing the second time."""
    configmap = next(d for d in documents(CLUSTER / "kuberay" / "nightly.yaml") if d["kind"] == "ConfigMap")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name, text in configmap["data"].items():
        (config_dir / name).write_text(text)
    store = tmp_path / "apiserver"
    store.mkdir()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    # `kubectl create -f FILE`: AlreadyExists when an object of that name was created before
    kubectl.write_text(f"""#!/bin/sh
name=$(sed -n 's/^  name: //p' "$3" | head -1)
if [ -e "{store}/$name" ]; then
  echo "Error from server (AlreadyExists): rayjobs.ray.io \\"$name\\" already exists" >&2; exit 1
fi
cp "$3" "{store}/$name"; echo "rayjob.ray.io/$name created"
""")
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)

    def night(job_name: str, **extra: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{kubectl.parent}{os.pathsep}{os.environ['PATH']}", "CONFIG_DIR": str(config_dir),
               "JOB_NAME": job_name, **extra}
        return subprocess.run(["/bin/sh", str(config_dir / "create-rayjob.sh")], env=env, capture_output=True,
                              text=True, timeout=30)

    scheduled = 29_455_320  # minutes since the epoch: 2026-01-02 02:00 UTC, as CronJob names its Jobs
    first = night(f"newsclip-nightly-{scheduled}")
    assert first.returncode == 0 and "created RayJob newsclip-nightly-20260102" in first.stdout, first.stderr
    retry = night(f"newsclip-nightly-{scheduled}")  # a retried pod, after midnight or not
    assert retry.returncode == 0 and "already exists" in retry.stdout
    assert [p.name for p in store.iterdir()] == ["newsclip-nightly-20260102"]
    created = yaml.safe_load((store / "newsclip-nightly-20260102").read_text())
    assert created["spec"]["jobId"] == "newsclip-nightly-20260102"
    assert created["metadata"]["labels"]["newsclip.io/date"] == "20260102"

    assert night(f"newsclip-nightly-{scheduled + 24 * 60}").returncode == 0  # the next night is a new RayJob
    assert night("by-hand", RUN_DATE="20251231").returncode == 0
    assert sorted(p.name for p in store.iterdir()) == ["newsclip-nightly-20251231", "newsclip-nightly-20260102",
                                                       "newsclip-nightly-20260103"]
    kubectl.write_text("#!/bin/sh\necho 'error: You must be logged in to the server (Unauthorized)' >&2; exit 1\n")
    failed = night(f"newsclip-nightly-{scheduled + 2 * 24 * 60}")
    assert failed.returncode == 1 and "Unauthorized" in failed.stderr  # other errors fail the Job (and retry)


def test_all_manifests_use_one_image_and_the_launcher_uses_it_too():
    images = set()
    for docs in manifests().values():
        for doc in docs:
            for pod in _pod_specs(doc):
                images |= {c["image"] for c in pod["containers"] if doc["kind"] != "CronJob"}
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert images == {launcher["docker"]["image"]}


# -------------------------------------------------------------------------------------------------- container
def test_dockerfile_base_image_copies_and_bake_step():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}")
    assert base.endswith("-gpu")
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert f"WORKDIR {IMAGE_HOME}" in text and "jobs ./jobs" in text  # the manifests' /home/ray/newsclip/jobs/...
    assert "cluster/bake.py --clip ${CLIP_BACKBONES} --argos ${ARGOS_PAIRS}" in text
    names = re.search(r'^ARG CLIP_BACKBONES="([^"]+)"', text, re.M).group(1).split()
    plan = subprocess.run([sys.executable, str(CLUSTER / "bake.py"), "--clip", *names, "--argos", "de:en",
                           "--dry-run"], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout.splitlines()[-1])["clip"] == names and len(names) == 9
    bad = subprocess.run([sys.executable, str(CLUSTER / "bake.py"), "--argos", "german", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "from:to" in bad.stderr


def test_runtime_env_is_valid_for_ray_and_ships_no_data():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**raw)  # Ray's own validation of the fields
    assert "working_dir" not in raw  # given on the command line: --working-dir .
    assert {"/.venv", "/.git", "*.parquet"} <= set(raw["excludes"])
    # the job's workers get what newsclip's own local Ray gives its workers (OpenMP's wait policy above all)
    from newsclip.runtime.ray_setup import WORKER_ENV

    assert raw["env_vars"]["OMP_WAIT_POLICY"] == WORKER_ENV["OMP_WAIT_POLICY"]
    assert all(isinstance(v, str) for v in raw["env_vars"].values())


def test_cluster_readme_commands_name_existing_files():
    text = (CLUSTER.parent / "README.md").read_text() + (CLUSTER / "README.md").read_text()
    for path in set(re.findall(r"(?<![\w/.-])((?:cluster|jobs)/[\w./-]+\.(?:ya?ml|py|md))", text)):
        assert (REPO / path).exists(), f"the docs name {path}, which does not exist"


def test_working_dir_upload_of_this_checkout_is_code_only(tmp_path):
    """What `--working-dir .` with jobs/runtime_env.yaml uploads: the package and job files, no venv or data."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["excludes"]
    package = tmp_path / "working_dir.zip"
    # include_gitignore=False: the excludes alone must keep the upload small (a checkout may lack .gitignore)
    create_package(str(REPO), package, include_gitignore=False, include_parent_dir=False, excludes=excludes)
    names = zipfile.ZipFile(package).namelist()
    assert "newsclip/cli.py" in names and "jobs/demo.yaml" in names and "newsclip/demo/data.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "newsclip-demo/")) or n.endswith(".parquet")
                or "__pycache__" in n]
    assert package.stat().st_size < 20 * 2**20  # Ray refuses working dirs over a few hundred MiB
