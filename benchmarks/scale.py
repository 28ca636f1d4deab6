"""Time and memory of a full run and a nightly run (1% new articles) against the archive's size: per stage wall
time and the driver's peak resident memory, and the peak memory of all the run's processes together; JSON and an
SVG plot.

    .venv/bin/python benchmarks/scale.py --sizes 10000,100000 [--new-share 0.01] [--workdir DIR] [--out FILE.json]

For each size: `newsclip demo-data` writes the archive (64 px images, in parallel processes), `newsclip run
jobs/nightly.yaml` runs over it in a fresh process (the full run: every article ranked against every image), then
1% new articles are appended and the same command runs again (the nightly run). Each run is timed as a scheduler
would see it, Python and Ray start-up included. The full run is the first night's, over the archive before the new
articles (1% smaller than the nightly run's). demo-tiny and the demo translator are built first if missing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
JOB = Path(__file__).resolve().parents[1] / "jobs" / "nightly.yaml"
PARTS = 20_000  # articles per demo-data writer


def _write_part(args: tuple) -> None:
    from newsclip.demo.data import write_demo_data

    data, start, n = args
    write_demo_data(data, n, seed=start, first_id=start, prefix=f"part-{start:08d}")


def write_archive(data: Path, articles: int) -> float:
    """The demo archive of `articles` articles, written by parallel processes in parts of PARTS; seconds taken."""
    started = time.perf_counter()
    parts = [(data, start, min(PARTS, articles - start)) for start in range(0, articles, PARTS)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_part, parts))
    return time.perf_counter() - started


class PeakMemory:
    """The peak resident memory of a process and, separately, of all its descendants together (Ray's workers),
    sampled every `interval` seconds while it runs."""

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil

        self.process, self.interval = psutil.Process(pid), interval
        self.driver = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.process.memory_info().rss)
                children = self.process.children(recursive=True)
                self.workers = max(self.workers, sum(_rss(c) for c in children))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"driver_peak_rss_mb": self.driver // 2**20, "workers_peak_rss_mb": self.workers // 2**20}


def _rss(process) -> int:
    import psutil

    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def run_job(data: Path, output: Path) -> dict:
    """`newsclip run jobs/nightly.yaml` over `data` into `output`, in a process of its own: seconds, memory, stages."""
    settings = [f"input.articles={data / 'articles'}", f"input.images={data / 'images'}", f"output_dir={output}",
                f"translate.cache_dir={output / 'translation-cache'}"]
    command = [sys.executable, "-m", "newsclip.cli", "run", str(JOB), *(a for s in settings for a in ("--set", s))]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    memory = PeakMemory(process.pid)
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit status {process.returncode}")
    seconds = time.perf_counter() - started
    record = json.loads((output / "manifest.json").read_text())["runs"][-1]
    stages = {name: {k: v for k, v in stage.items() if k in ("status", "seconds", "driver_peak_rss_mb")}
              for name, stage in record["stages"].items()}
    return {"seconds": round(seconds, 2), **memory.stop(), "stages": stages,
            "encoded": record["stages"]["encode"].get("encoded", 0)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="archive sizes, comma-separated")
    parser.add_argument("--new-share", type=float, default=0.01)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, help="also write the JSON here (and the plot beside it as .svg)")
    args = parser.parse_args(argv)

    from newsclip.cli import _ensure_demo_translator
    from newsclip.demo.data import append_demo_data
    from newsclip.demo.model import ensure_demo_model
    from newsclip.translate.translator import TranslateConfig

    ensure_demo_model()
    _ensure_demo_translator(Path(TranslateConfig().resolved().packages_dir))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="newsclip-scale-"))
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        data, output = root / f"data-{size}", root / f"out-{size}"
        row = {"articles": size, "write_seconds": round(write_archive(data, size), 1)}
        row["full"] = run_job(data, output)
        new = max(1, round(size * args.new_share))
        append_demo_data(data, new, seed=1)
        row["new_articles"] = new
        row["nightly"] = run_job(data, output)
        row["nightly_over_full"] = round(row["nightly"]["seconds"] / row["full"]["seconds"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"cpus": os.cpu_count(), "job": str(JOB.name), "new_share": args.new_share, "sizes": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".svg").write_text(plot(rows))
    return result


def plot(rows: list[dict]) -> str:
    """Two charts side by side: seconds, and peak memory (driver; all processes), against the archive's size."""
    import math

    from newsclip.report.escape import esc
    from newsclip.report.svg import PALETTE

    sizes = [r["articles"] for r in rows]
    lo, hi = math.log10(min(sizes)), math.log10(max(sizes)) + 1e-9

    def chart(x0: int, title: str, series: dict[str, list[float]], unit: str) -> list[str]:
        top = max(max(v) for v in series.values()) * 1.1 or 1
        w, h, left, y0 = 330, 220, 50, 30
        span = hi - lo

        def px(size: int) -> float:
            return x0 + left + ((math.log10(size) - lo) / span * w if span > 1e-6 else w / 2)

        def py(value: float) -> float:
            return y0 + h - value / top * h

        out = [f'<text x="{x0 + left}" y="18" font-weight="bold">{esc(title)}</text>',
               f'<rect x="{x0 + left}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
               f'<text x="{x0 + 4}" y="{y0 + 10}">{top:.0f} {esc(unit)}</text>',
               f'<text x="{x0 + 4}" y="{y0 + h}">0</text>']
        out += [f'<text x="{px(s):.1f}" y="{y0 + h + 16}" text-anchor="middle">{s:,}</text>' for s in sizes]
        for i, (name, values) in enumerate(series.items()):
            color = PALETTE[i]
            points = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in zip(sizes, values))
            out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
            out += [f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="3" fill="{color}"><title>{esc(name)} at {s:,}: '
                    f'{v:.1f} {esc(unit)}</title></circle>' for s, v in zip(sizes, values)]
            out.append(f'<text x="{x0 + left + 8}" y="{y0 + 16 + 14 * i}" fill="{color}">{esc(name)}</text>')
        return out

    seconds = {"full run": [r["full"]["seconds"] for r in rows], "nightly (1% new)": [r["nightly"]["seconds"]
                                                                                      for r in rows]}
    memory = {f"{run} {who}": [r[run][f"{who}_peak_rss_mb"] for r in rows]
              for run in ("full", "nightly") for who in ("driver", "workers")}
    parts = [*chart(0, "seconds against articles (log)", seconds, "s"),
             *chart(420, "peak memory against articles (log)", memory, "MiB")]
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="820" height="280" style="font-family:sans-serif;'
            'font-size:11px" role="img" aria-label="newsclip at archive scale">' + "".join(parts) + "</svg>\n")


if __name__ == "__main__":
    main()
