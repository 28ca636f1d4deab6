"""benchmarks/: every script the README lists answers --help at once, and what the scripts import is declared."""

import ast
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# what --help must not import: each costs seconds (or starts threads) and none is needed to print the usage
HEAVY = {"torch", "torchvision", "ray", "faiss", "clip", "argostranslate", "ctranslate2", "transformers",
         "onnxruntime", "polars", "pyarrow", "PIL", "newsclip"}


def listed() -> list[str]:
    """The benchmark scripts the README names (`benchmarks/NAME.py` or `.sh`), in the order it names them."""
    found = re.findall(r"\bbenchmarks/[\w-]+\.(?:py|sh)\b", (REPO / "README.md").read_text())
    return list(dict.fromkeys(found))


def _help(script: str) -> tuple[subprocess.CompletedProcess, float]:
    """`script --help` as the README runs it: a .sh directly, a .py with this interpreter. Python reports every
    module it imports on stderr (PYTHONPROFILEIMPORTTIME), also under the .sh, which execs Python."""
    command = [str(REPO / script)] if script.endswith(".sh") else [sys.executable, script]
    started = time.perf_counter()
    done = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    return done, time.perf_counter() - started


@cache
def _helps() -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """All of them at once, in parallel subprocesses (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(listed(), pool.map(_help, listed())))


def test_the_readme_lists_the_benchmarks():
    scripts = listed()
    assert "benchmarks/knn_scale.py" in scripts and "benchmarks/gpu_check.sh" in scripts, scripts
    for script in scripts:
        assert (REPO / script).is_file(), f"README names {script}, which does not exist"
    assert os.access(BENCHMARKS / "gpu_check.sh", os.X_OK), "the README runs benchmarks/gpu_check.sh directly"


@pytest.mark.parametrize("script", listed())
def test_help_exits_0_with_usage_and_no_heavy_imports(script):
    done, seconds = _helps()[script]
    assert done.returncode == 0, f"{script} --help: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert done.stdout.startswith("usage: "), f"{script} --help printed:\n{done.stdout[:500]}"
    assert "--help" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    heavy = sorted(imported & HEAVY)
    assert not heavy, f"{script} --help imports {heavy} ({seconds:.1f}s): import them inside main, after parse_args"


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """The distributions `make setup` installs by name: the dependencies and the `test` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def test_every_module_the_benchmarks_import_is_declared():
    """A module found only as something else's dependency, or only once `ray` is imported (Ray vendors psutil),
    is not declared: a fresh `make setup` may not have it."""
    local = {p.stem for p in BENCHMARKS.glob("*.py")} | {"newsclip"}
    providers = packages_distributions()
    declared = _declared()
    missing = {}
    for path in sorted(BENCHMARKS.glob("*.py")):
        for module in sorted(_top_level_imports(path) - local - set(sys.stdlib_module_names)):
            dists = {_normalise(d) for d in providers.get(module, [])}
            if not dists & declared:
                missing.setdefault(module, []).append(f"{path.name} (installed by: {sorted(dists) or 'nothing'})")
    assert not missing, f"imported by benchmarks/ but not declared in pyproject.toml: {missing}"


@pytest.mark.slow  # two whole knn + evaluate runs in a process of their own
def test_scale_from_embeddings_times_a_full_and_a_nightly_knn_and_evaluate(tmp_path):
    """`scale.py --from-embeddings` at 3,000 pairs: both runs recorded, the nightly searched in full only the new
    queries and merged the old ones, its rankings equal a full search's, an IVF search reports its recall, and the
    plot was written."""
    import json

    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, "benchmarks/scale.py", "--from-embeddings", "--sizes", "3000",
                           "--workdir", str(tmp_path / "work"), "--out", str(out), "--approximate", "knn.index=ivf",
                           "--approximate", "knn.nprobe=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["sizes"]
    assert row["mode"] == "from-embeddings" and row["articles"] == 3000 and row["new_articles"] == 30
    for run in ("full", "nightly"):
        assert row[run]["seconds"] > 0 and row[run]["driver_peak_rss_mb"] > 0, row[run]
        assert set(row[run]["stages"]) == {"knn", "evaluate"}, row[run]
        assert 0.3 < row[run]["mrr"]["text_to_image"] < 0.95, row[run]["mrr"]  # meaningful, not trivial
    full, nightly = row["full"]["knn"]["text_to_image"], row["nightly"]["knn"]["text_to_image"]
    assert full["searched_in_full"] == full["queries"] == 3000 and full["merged"] == 0, full
    assert nightly["searched_in_full"] == 30 and nightly["merged"] == 3000 and nightly["queries"] == 3030, nightly
    assert row["rankings_equal_full"] is True
    assert row["nightly_over_full"] > 0
    approximate = row["approximate"]["knn"]["text_to_image"]  # IVF, 2 of 38 lists per shard: recall below 1
    assert approximate["searched_in_full"] == 3030 and 0 < approximate["recall_at_k"] < 1, approximate
    assert out.with_suffix(".svg").read_text().startswith("<svg")


# ---------------------------------------------------------------------------------------------- the GPU check
# What the GPU machine lacks (shared/gpu/make-carry.sh): a sitecustomize on PYTHONPATH hides them from every process
# of a run, Ray's workers included, as if they were not installed.
HIDE_POLARS_AND_FAISS = '''import sys


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"polars", "faiss"}:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: the GPU machine has none)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
'''


def _gpu_check(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """benchmarks/gpu_check.sh with this interpreter, polars and faiss hidden; (the run, its JSON)."""
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(HIDE_POLARS_AND_FAISS)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(hide), str(REPO)]), **env}
    hidden = subprocess.run([sys.executable, "-c", "import polars"], env=env, capture_output=True, text=True)
    assert hidden.returncode != 0 and "hidden" in hidden.stderr, "the sitecustomize did not hide polars"
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([str(BENCHMARKS / "gpu_check.sh"), *args, str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)
    return done, json.loads(out.read_text()) if out.exists() else {}


@pytest.mark.slow
@pytest.mark.long  # about a minute on 2 cores (a Ray pool, every encode path)
def test_gpu_check_dry_run_fills_every_row_without_polars_or_faiss(tmp_path):
    """The CPU dry run at its smallest (demo-tiny's architecture) passes every step with polars and faiss hidden:
    every throughput row has rates for both sides and the baselines, and the bars are read off them (issue 22)."""
    done, result = _gpu_check(tmp_path, "--device", "cpu", "--tiny")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert result["throughput"], result
    for row in result["throughput"]:
        assert "error" not in row, row
        for part in ("newsclip_stage", "newsclip_stage_texts"):
            assert row[part]["rows_per_s"] > 0 and row[part]["encoded"] == 32, (row["flags"], part, row[part])
        assert row["plain_loop"]["images_per_s"] > 0 and row["dataloader_loop"]["images_per_s"] > 0, row
        assert row["model_only"]["images_per_s"] > 0 and row["model_only"]["texts_per_s"] > 0, row
    assert [(row["backbone"], row["flags"]) for row in result["throughput"]] == [
        ("demo-tiny", []), ("demo-tiny", ["--jpeg-draft"]), ("demo-tiny", ["--decode", "gpu"]),
        ("ViT-S-32", [])]  # the open_clip row (SigLIP2 ViT-B-16 on a GPU), with open_clip's small ViT here
    bar = result["bars"]["demo-tiny"]
    assert bar["images_per_s_with_startup"] > 0 and bar["over_dataloader"] > 0, bar
    for precision in ("fp16", "fp32", "bf16"):
        assert "error" not in result["correctness"][precision], result["correctness"]
        assert "error" not in result["correctness"]["ViT-B-16-SigLIP2"][precision], result["correctness"]
    assert result["cuda_tests"]["exit_status"] == 0, result["cuda_tests"]
    assert result["finetune"]["images_per_s"] > 0, result["finetune"]
    knn = result["knn"]  # the torch kNN engine with the GPU's recipe (fp16 products), at toy sizes
    assert knn["dim_64"]["queries_per_s"] > 0 and knn["dim_64"]["rankings_equal_reference"] is True, knn
    assert knn["dim_64"]["products"] == "fp16" and knn["all_against_all"]["seconds"] > 0, knn
    served = result["serve"]  # serve's search with the GPU's recipe against the CPU's pass
    assert served["answers_equal"] is True and served["products"] == "fp16" and served["gpu_ms_p50"] > 0, served


def test_gpu_check_exits_1_naming_the_step_that_failed(tmp_path):
    """A step that raises is recorded, the steps after it still run, and the exit status is 1 with the step and its
    error on stderr."""
    done, result = _gpu_check(tmp_path, "--device", "cpu", "--steps", "finetune,bars",
                              NEWSCLIP_GPU_CHECK_FAIL="finetune")
    assert done.returncode == 1, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "FAILED finetune: RuntimeError: a failure injected by NEWSCLIP_GPU_CHECK_FAIL=finetune" in done.stderr
    assert "error" in result["finetune"] and result["bars"] == {}, result
    bad = subprocess.run([str(BENCHMARKS / "gpu_check.sh"), "--steps", "throughput,nonsense"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert bad.returncode == 2 and "nonsense is not a step" in bad.stderr, bad.stderr


def test_gpu_check_counts_an_error_anywhere_in_its_result_as_a_failure():
    """The errors of issue 22 (every throughput row's, recorded while the step itself returned) each fail the check,
    named by step, row and flags; so does a CUDA test run that did not pass, or a table that gave no bar."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    path = list(sys.path)
    try:
        gpu_check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_check)
    finally:
        sys.path[:] = path  # it puts benchmarks/ first, for its own imports
    keyerror = "KeyError: 'Field \"file\" does not exist in schema'"
    result = {"cuda_tests": {"exit_status": 1, "summary": ["1 failed"], "stderr": ""},
              "correctness": {"fp16": {"label": "fp16"}, "bf16": {"error": "RuntimeError: no bf16"}},
              "throughput": [{"backbone": "ViT-B/32", "flags": [], "error": keyerror},
                             {"backbone": "ViT-B/32", "flags": ["--jpeg-draft"], "error": keyerror}],
              "finetune": {"images_per_s": 10.0}, "bars": {}}
    assert gpu_check.failures(result) == [
        "correctness.bf16: RuntimeError: no bf16",
        f"throughput[0] (ViT-B/32): {keyerror}",
        f"throughput[1] (ViT-B/32 --jpeg-draft): {keyerror}",
        "cuda_tests: pytest exited 1: ['1 failed'] ",
        "bars: none computed from the throughput table"]
    assert gpu_check.failures({"finetune": {"images_per_s": 10.0}, "bars": {}}) == []
