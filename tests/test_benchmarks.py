"""benchmarks/: every script the README lists answers --help at once, and what the scripts import is declared."""

import ast
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
