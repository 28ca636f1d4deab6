"""A nightly run with 1% new articles against a full run over the same archive: seconds and rows encoded,
as ratios; prints JSON.

    .venv/bin/python benchmarks/nightly.py --articles 4000 [--new-share 0.01] [--workdir DIR]

1. `newsclip demo-data` writes an archive of --articles articles; `jobs/nightly.yaml` runs over it once (this
   builds the store and warms Ray; not timed).
2. --new-share of that many new articles are appended as new shards (`demo-data --append`).
3. nightly: the same job again (it reuses the store).
4. full: the same job over the same grown archive into a fresh output folder and store.
Every run is `newsclip run` in a process of its own, as a scheduler starts it: the timed runs include the Python
start, and Ray's when a run uses it (a small night does not: `ray.inline_rows`). Each output folder has its own
translation cache. demo-tiny and the demo translator are built first if missing (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
JOB = Path(__file__).resolve().parents[1] / "jobs" / "nightly.yaml"


def _run(data: Path, output: Path) -> tuple[float, dict]:
    from newsclip.runtime.store import read_manifest

    # a translation cache per output folder: the full run must not find the nightly run's translations
    settings = [f"input.articles={data / 'articles'}", f"input.images={data / 'images'}", f"output_dir={output}",
                f"translate.cache_dir={output / 'translation-cache'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    command = [sys.executable, "-m", "newsclip.cli", "run", str(JOB), *(a for s in settings for a in ("--set", s))]
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - started
    return seconds, read_manifest(output)["runs"][-1]


def _facts(seconds: float, record: dict) -> dict:
    stages = record["stages"]
    return {"seconds": round(seconds, 2), "encoded": stages["encode"].get("encoded", 0),
            "reused": stages["encode"].get("reused", 0), "translated": stages["translate"].get("new", 0),
            "stage_seconds": {name: stage.get("seconds", 0.0) for name, stage in stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=4000)
    parser.add_argument("--new-share", type=float, default=0.01)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    from newsclip.cli import _ensure_demo_translator
    from newsclip.demo.data import append_demo_data, write_demo_data
    from newsclip.demo.model import ensure_demo_model
    from newsclip.runtime.layout import Layout
    from newsclip.translate.translator import TranslateConfig

    ensure_demo_model()
    _ensure_demo_translator(Path(TranslateConfig().resolved().packages_dir))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="newsclip-nightly-bench-"))
    data = root / "data"
    write_demo_data(data, args.articles, seed=0)
    _run(data, root / "nightly")  # day 0: builds the store
    new = max(1, round(args.articles * args.new_share))
    append_demo_data(data, new, seed=1)
    nightly = _facts(*_run(data, root / "nightly"))
    full = _facts(*_run(data, root / "full"))
    result = json.dumps({
        "archive_articles": args.articles + new, "new_articles": new, "cpus": os.cpu_count(),
        "nightly": nightly, "full": full,
        "seconds_ratio": round(nightly["seconds"] / full["seconds"], 3),
        "encoded_ratio": round(nightly["encoded"] / max(1, full["encoded"]), 4),
        "rankings_equal": Layout(root / "nightly").rankings_tsv("demo-tiny").read_bytes()
        == Layout(root / "full").rankings_tsv("demo-tiny").read_bytes(),
    }, indent=2)
    print(result)
    if args.out:
        args.out.write_text(result + "\n")


if __name__ == "__main__":
    main()
