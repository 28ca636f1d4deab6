"""Time and memory of a full run and a nightly run (1% new articles) against the archive's size: per stage wall
time and the driver's peak resident memory, and the peak memory of all the run's processes together; JSON and an
SVG plot.

    .venv/bin/python benchmarks/scale.py --sizes 10000,100000 [--new-share 0.01] [--workdir DIR] [--out FILE.json]

For each size: `newsclip demo-data` writes the archive (64 px images, in parallel processes), `newsclip run
jobs/nightly.yaml` runs over it in a fresh process (the full run: every article ranked against every image), then
1% new articles are appended and the same command runs again (the nightly run). Each run is timed as a scheduler
would see it, Python and Ray start-up included. The full run is the first night's, over the archive before the new
articles (1% smaller than the nightly run's). demo-tiny and the demo translator are built first if missing.

    .venv/bin/python benchmarks/scale.py --from-embeddings --sizes 10000,100000,1000000 [--check-equal]

With --from-embeddings only the kNN and evaluate stages run, from what prepare, translate and encode would have
left in the output folder: synthetic demo-tiny embeddings (64-d, shaped like CLIP's by synthetic_embeddings.py:
topics of uneven size, anisotropic spread, a text-image gap; seeded), the query texts, prepared/queries and
candidates.parquet,
written in parts of SYNTH_PART pairs with encode entries in manifest.json. The full run is `knn` then `evaluate`
over N pairs, the nightly run the same after 1% new pairs (new ids) are appended, each in a process of its own
(`--stages-only`, hidden). --check-equal (the default up to 100,000 pairs) then ranks the nightly's embeddings
again in a fresh folder, a full search, and records whether its rankings equal the nightly's."""

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
# --from-embeddings: pairs per written part (what generating them holds at once), demo-tiny's width, and each side's
# own noise (synthetic_embeddings.Shape.noise) times NOISE times the source's factor times a lognormal spread, so some
# articles are easy and some hard: NOISE 0.3 makes 64-d pairs about as hard as demo-tiny's (MRR@100 ~0.41 at 3,000
# pairs, ~0.30 at 20,000)
SYNTH_PART = 100_000
DIM = 64
NOISE, NOISE_SPREAD = 0.3, 0.5
SOURCES = {"TW": (1512, 1.0), "RSS": (134, 1.25), "RT": (354, 0.85)}  # the demo's shares; noise factor
BACKBONE = "demo-tiny"
CHECK_EQUAL_UP_TO = 100_000  # --check-equal's default: on up to this many pairs


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
    from newsclip.runtime.store import read_manifest

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
    record = read_manifest(output)["runs"][-1]
    stages = {name: {k: v for k, v in stage.items() if k in ("status", "seconds", "driver_peak_rss_mb")}
              for name, stage in record["stages"].items()}
    return {"seconds": round(seconds, 2), **memory.stop(), "stages": stages,
            "encoded": record["stages"]["encode"].get("encoded", 0)}


def synthetic_pairs(first: int, count: int, seed: int) -> tuple:
    """Pairs `first` .. `first + count - 1`: (text embeddings, image embeddings, query rows), as the encode stage and
    prepare write them. The same (first, count, seed) gives the same tables."""
    import numpy as np
    import pyarrow as pa
    import synthetic_embeddings

    from newsclip.runtime.embedding_store import content_keys
    from newsclip.runtime.store import embedding_table

    rng = np.random.default_rng([seed, first])
    names = list(SOURCES)
    shares = np.array([share for share, _ in SOURCES.values()], np.float64)
    source = rng.choice(len(names), size=count, p=shares / shares.sum())
    scale = NOISE * np.array([f for _, f in SOURCES.values()], np.float32)[source] \
        * np.exp(NOISE_SPREAD * rng.standard_normal(count, dtype=np.float32))
    texts, images, _ = synthetic_embeddings.pairs(first, count, DIM, seed, noise_factor=scale)
    numbers = range(first, first + count)
    article_ids, image_ids = [f"a{i:08d}" for i in numbers], [f"i{i:08d}" for i in numbers]
    text_table = embedding_table(article_ids, texts, "article_id").append_column(
        "hash", content_keys(f"text {seed} {i}" for i in numbers))
    image_table = embedding_table(image_ids, images, "image_id").append_column(
        "hash", content_keys(f"image {seed} {i}" for i in numbers))
    queries = pa.table({"article_id": pa.array(article_ids, pa.string()), "image_id": pa.array(image_ids, pa.string()),
                        "source": pa.array(np.array(names, object)[source], pa.string())})
    return text_table, image_table, queries


def write_synthetic(output: Path, first: int, count: int, seed: int = 0) -> float:
    """Add pairs `first` .. `first + count - 1` to `output` as prepare, translate and encode would have left them for
    jobs/nightly.yaml: embeddings/demo-tiny/{texts,images}/, translated/ and prepared/queries/ gain parts of at most
    SYNTH_PART rows, prepared/candidates.parquet is rewritten with them added (streamed), and the encode entries
    name every part and one store (the same for every call, so a nightly kNN builds on the last). Seconds taken."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from newsclip.names import encode_entry, slug
    from newsclip.runtime.layout import Layout
    from newsclip.runtime.store import atomic_path, parquet_files, record_stage, write_table

    started = time.perf_counter()
    layout = Layout(output)
    embeddings = {side: layout.embeddings_of(slug(BACKBONE), side) for side in ("texts", "images")}
    candidates = layout.prepared.candidates
    with atomic_path(candidates) as tmp:
        writer = None
        if candidates.exists():
            old = pq.ParquetFile(candidates)
            writer = pq.ParquetWriter(tmp, old.schema_arrow)
            for batch in old.iter_batches():
                writer.write_batch(batch)
        for start in range(first, first + count, SYNTH_PART):
            texts, images, queries = synthetic_pairs(start, min(SYNTH_PART, first + count - start), seed)
            name = f"part-{start:08d}.parquet"
            write_table(texts, embeddings["texts"] / name)
            write_table(images, embeddings["images"] / name)
            for folder in (layout.translated, layout.prepared.queries):
                write_table(queries, folder / name)
            rows = pa.table({"image_id": images.column("image_id"), "image_hash": images.column("hash"),
                             "candidate": pa.array([True] * len(images), pa.bool_())})
            writer = writer or pq.ParquetWriter(tmp, rows.schema)
            writer.write_table(rows)
        writer.close()
    for side in ("texts", "images"):
        files = parquet_files(embeddings[side])
        record_stage(output, encode_entry(BACKBONE, side), files, store=f"synthetic/{slug(BACKBONE)}/{side}",
                     rows=sum(pq.ParquetFile(f).metadata.num_rows for f in files), synthetic_seed=seed)
    return time.perf_counter() - started


KNN_FACTS = ("queries", "candidates", "searched_in_full", "merged", "recall_at_k", "seconds")


def run_stages(output: Path, stages: tuple[str, ...] = ("knn", "evaluate"), settings: list[str] = ()) -> dict:
    """The job's `stages` over `output` in a process of its own (`--stages-only`): seconds (start-up included),
    the driver's peak memory per stage and sampled, each kNN direction's facts, and the MRR@k per direction."""
    from newsclip.runtime.layout import Layout
    from newsclip.runtime.store import read_manifest

    result = output / f".stages-{time.time_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--stages-only", ",".join(stages),
               "--output", str(output), "--result", str(result), *(a for s in settings for a in ("--set", s))]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    memory = PeakMemory(process.pid)
    if process.wait() != 0:
        memory.stop()
        raise SystemExit(f"{' '.join(command)} failed with exit status {process.returncode}")
    seconds = time.perf_counter() - started
    done = {"seconds": round(seconds, 2), **memory.stop(), **json.loads(result.read_text())}
    result.unlink()
    entries = read_manifest(output)["stages"]
    done["knn"] = {name.rsplit(":", 1)[1]: {k: entry.get(k) for k in KNN_FACTS}
                   for name, entry in entries.items() if name.startswith("knn:")}
    if "evaluate" in stages:
        rows = json.loads(Layout(output).metrics_json.read_text())["rows"]
        done["mrr"] = {r["direction"]: round(r["mrr"], 4) for r in rows
                       if r.get("backbone") == BACKBONE and r["source"] == "all"}
    return done


def _stages_only(stages: list[str], output: Path, result: Path, settings: list[str]) -> None:
    """The hidden --stages-only mode: jobs/nightly.yaml's `stages` over `output`, timed one by one."""
    from newsclip import config
    from newsclip.runtime.runner import _peak_rss_mb, _reset_peak_rss
    from newsclip.stages import evaluate, knn

    run = {"knn": knn.run, "evaluate": evaluate.run}
    cfg = config.load(JOB, [f"output_dir={output}", f"translate.cache_dir={output / 'translation-cache'}", *settings])
    done = {}
    for name in stages:
        _reset_peak_rss()
        started = time.perf_counter()
        run[name](cfg)
        done[name] = {"status": "done", "seconds": round(time.perf_counter() - started, 2),
                      "driver_peak_rss_mb": _peak_rss_mb()}
    result.write_text(json.dumps({"stages": done}))


def fresh_copy(output: Path, suffix: str) -> Path:
    """A folder beside `output` holding its embeddings (hard links) and encode entries, and no rankings: the knn
    stage there is a full search."""
    import shutil

    from newsclip.runtime.layout import Layout
    from newsclip.runtime.store import read_manifest, record_stage

    fresh = output.with_name(f"{output.name}-{suffix}")
    shutil.rmtree(fresh, ignore_errors=True)
    for path in sorted(Layout(output).embeddings.rglob("*.parquet")):
        target = fresh / path.relative_to(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    for name, entry in read_manifest(output)["stages"].items():
        if name.startswith("encode:"):
            facts = {k: v for k, v in entry.items() if k not in ("committed_at", "files", "sha256")}
            record_stage(fresh, name, [fresh / f for f in entry["files"]], **facts)
    return fresh


def rankings_equal_full(output: Path, settings: list[str]) -> tuple[bool, dict]:
    """Whether the kNN rankings in `output` (a nightly's) equal a full search's, run in a `fresh_copy`."""
    import shutil

    import pyarrow.parquet as pq

    from newsclip.names import rankings_stem
    from newsclip.runtime.layout import Layout
    from newsclip.runtime.store import read_manifest

    fresh = fresh_copy(output, "full-check")
    check = run_stages(fresh, ("knn",), settings)
    stems = sorted(rankings_stem(e["backbone"], e["direction"]) for name, e in read_manifest(output)["stages"].items()
                   if name.startswith("knn:"))
    mine, full = Layout(output), Layout(fresh)
    equal = bool(stems) and all(pq.read_table(mine.rankings_parquet(s)).equals(pq.read_table(full.rankings_parquet(s)))
                                for s in stems)
    shutil.rmtree(fresh)
    return equal, check


def approximate_search(output: Path, settings: list[str], approximate: list[str]) -> dict:
    """The kNN stage over the nightly's archive with an approximate index (`approximate`: settings such as
    knn.index=ivf), as a full search in a `fresh_copy`: its time, memory and recall@k against exact search."""
    import shutil

    fresh = fresh_copy(output, "approximate")
    result = {"settings": approximate, **run_stages(fresh, ("knn",), [*settings, *approximate])}
    shutil.rmtree(fresh)
    return result


def from_embeddings(root: Path, size: int, new_share: float, seed: int, check: bool | None,
                    settings: list[str], approximate: list[str] = ()) -> dict:
    """One size of --from-embeddings: the full run over `size` synthetic pairs, then the nightly after 1% more."""
    output = root / f"emb-{size}"
    if output.exists() and any(output.iterdir()):
        raise SystemExit(f"{output} exists: remove it or choose another --workdir")
    row = {"articles": size, "mode": "from-embeddings",
           "write_seconds": round(write_synthetic(output, 0, size, seed), 1)}
    row["full"] = run_stages(output, settings=settings)
    new = max(1, round(size * new_share))
    row["new_articles"] = new
    row["append_seconds"] = round(write_synthetic(output, size, new, seed), 1)
    row["nightly"] = run_stages(output, settings=settings)
    row["nightly_over_full"] = round(row["nightly"]["seconds"] / row["full"]["seconds"], 3)
    if check if check is not None else size <= CHECK_EQUAL_UP_TO:
        row["rankings_equal_full"], row["full_search_check"] = rankings_equal_full(output, settings)
    if approximate:
        row["approximate"] = approximate_search(output, settings, approximate)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="archive sizes, comma-separated")
    parser.add_argument("--new-share", type=float, default=0.01)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, help="also write the JSON here (and the plot beside it as .svg)")
    parser.add_argument("--from-embeddings", action="store_true",
                        help="time only the kNN and evaluate stages, from synthetic embeddings (see above)")
    parser.add_argument("--check-equal", action=argparse.BooleanOptionalAction, default=None,
                        help=f"--from-embeddings: also check the nightly rankings equal a full search's "
                             f"(default: up to {CHECK_EQUAL_UP_TO:,} articles)")
    parser.add_argument("--seed", type=int, default=0, help="--from-embeddings: the synthetic embeddings' seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--from-embeddings: a job setting for the timed stages, e.g. "
                             "eval.directions=[text_to_image] (repeatable)")
    parser.add_argument("--approximate", action="append", default=[], metavar="KEY=VALUE",
                        help="--from-embeddings: also time a full kNN with these settings after the nightly, e.g. "
                             "knn.index=ivf (repeatable), with its recall@k against exact search")
    parser.add_argument("--stages-only", help=argparse.SUPPRESS)  # internal: one timed run of run_stages
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stages_only:
        _stages_only(args.stages_only.split(","), args.output, args.result, args.set)
        return {}
    if args.from_embeddings:
        root = args.workdir or Path(tempfile.mkdtemp(prefix="newsclip-scale-"))
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(from_embeddings(root, size, args.new_share, args.seed, args.check_equal, args.set,
                                        args.approximate))
            print(json.dumps(rows[-1]), flush=True)
        return _result(args, rows, mode="from-embeddings", settings=args.set)

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
    return _result(args, rows)


def _result(args: argparse.Namespace, rows: list[dict], **facts) -> dict:
    result = {"cpus": os.cpu_count(), "job": str(JOB.name), "new_share": args.new_share, **facts, "sizes": rows}
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
