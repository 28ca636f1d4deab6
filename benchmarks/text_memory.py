"""The driver's peak memory in the stages that read article texts, against archive size: prints JSON.

    .venv/bin/python benchmarks/text_memory.py [--articles 50000,200000] [--body-bytes 4096] [--out FILE]

For each size: synthetic articles with bodies of --body-bytes (10 shards; 1,000 small images that the articles
share, so the image check stays small), then each stage in a process of its own over them, with its peak RSS:
- prepare (`eval.sample_size: null`, `eval.candidates: all`: every article is a query, the largest text output);
- translate, a full run (the articles are English: the Translator passes them through, so this measures the data
  path, not Argos);
- encode's text side up to the model: `wanted_rows`, which hashes every query text to find the ones to encode.
Prepare's and translate's drivers hold counts and file lists (their per-article work runs as Ray tasks over
partitions spilled to disk) and one batch, range or part of rows, so their peak should not grow with the archive;
encode's still holds the ids and hashes of every article.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("prepare", "translate", "encode-texts")


def write_archive(root: Path, articles: int, body_bytes: int, shards: int = 10) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "articles").mkdir(parents=True)
    (root / "images").mkdir()
    images = []
    for _ in range(1000):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    pq.write_table(pa.table({"image_id": [f"i{i}" for i in range(1000)], "image": images}),
                   root / "images" / "part-0.parquet")
    words = np.array(["city", "council", "vote", "river", "bridge", "match", "team", "storm", "market", "school"])
    for shard in range(shards):
        numbers = range(shard * articles // shards, (shard + 1) * articles // shards)
        body = " ".join(words[rng.integers(0, len(words), body_bytes // 6)])[:body_bytes]
        table = {"article_id": [f"a{n:08d}" for n in numbers], "title": [f"title {n}" for n in numbers],
                 "text": [f"{n} {body}" for n in numbers], "image_id": [f"i{n % 1000}" for n in numbers],
                 "source": ["TW"] * len(numbers), "lang": ["en"] * len(numbers)}
        pq.write_table(pa.table(table), root / "articles" / f"part-{shard:05d}.parquet")


def run_stage(stage: str, data: Path, output: Path) -> None:
    """One stage in this process; prints its seconds and this process's peak RSS as JSON."""
    from newsclip import config

    cfg = config.load(None, [f"input.articles={data / 'articles'}", f"input.images={data / 'images'}",
                             f"output_dir={output}", "eval.sample_size=null", "eval.candidates=all",
                             f"translate.packages_dir={output / 'no-packages'}",
                             f"translate.cache_dir={output / 'translation-cache'}", "ray.num_cpus=2"])
    started = time.perf_counter()
    if stage == "prepare":
        from newsclip.stages import prepare

        rows = prepare.run(cfg)["queries"]
    elif stage == "translate":
        from newsclip.stages import translate

        rows = translate.run(cfg)["rows"]
    else:
        from newsclip.encoding import TEXTS, wanted_rows

        rows = len(wanted_rows(cfg, TEXTS)[1])
    print(json.dumps({"stage": stage, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
                      "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", default="50000,200000", help="archive sizes, comma-separated")
    parser.add_argument("--body-bytes", type=int, default=4096, help="bytes of each article's body")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="default: a temporary folder; an archive already written there is used again")
    parser.add_argument("--stages", default=",".join(STAGES), help="the stages to measure, comma-separated")
    parser.add_argument("--write-only", action="store_true", help="write the archives and stop")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage, in this process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args.stage, args.data, args.output)
        return {}

    root = args.workdir or Path(tempfile.mkdtemp(prefix="newsclip-text-memory-"))
    rows = []
    for size in (int(s) for s in args.articles.split(",")):
        data, output = root / f"data-{size}", root / f"output-{size}"
        if not (data / "articles").is_dir():
            write_archive(data, size, args.body_bytes)
        if args.write_only:
            continue
        (output / "no-packages").mkdir(parents=True, exist_ok=True)
        stages = {}
        for stage in args.stages.split(","):
            done = subprocess.run([sys.executable, __file__, "--stage", stage, "--data", str(data),
                                   "--output", str(output)], check=True, capture_output=True, text=True)
            stages[stage] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{size} articles, {stage}: {stages[stage]}", file=sys.stderr)
        rows.append({"articles": size, "body_mb": round(size * args.body_bytes / 2**20), "stages": stages})
    result = {"benchmark": "text_memory", "body_bytes": args.body_bytes, "sizes": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
