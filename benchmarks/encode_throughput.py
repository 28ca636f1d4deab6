"""Images per second of the encode stage inside Ray against a plain single-process loop; prints JSON.

    .venv/bin/python benchmarks/encode_throughput.py --images 4000 [--backbone demo-tiny] [--actors 1]

Both read the same Parquet shards, decode, preprocess, encode with the same model and batch size, and write
Parquet. The Ray figure includes starting the actor pool (a real cost of every run); Ray itself is started
before the clock.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def plain_loop(files: list[Path], backbone: str, batch_size: int, threads: int, out: Path) -> int:
    """The baseline: one process, no Ray; read, decode, preprocess, encode, write."""
    import pyarrow.parquet as pq
    import torch

    from newsclip.backbones import load_backbone
    from newsclip.images import ImageDecodeError, decode_image
    from newsclip.store import embedding_table, write_table

    torch.set_num_threads(threads)
    model, preprocess = load_backbone(backbone, "cpu")
    done = 0
    for i, path in enumerate(files):
        for j, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=batch_size)):
            ids, tensors = [], []
            for image_id, data in zip(batch.column("image_id").to_pylist(), batch.column("image").to_pylist()):
                try:
                    tensors.append(preprocess(decode_image(data)))
                    ids.append(image_id)
                except ImageDecodeError:
                    pass
            with torch.inference_mode():
                features = torch.nn.functional.normalize(model.encode_image(torch.stack(tensors)).float(), dim=-1)
            write_table(embedding_table(ids, features.numpy(), "image_id"), out / f"part-{i:04d}-{j:04d}.parquet")
            done += len(ids)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--backbone", default="demo-tiny", help="a registry name or checkpoint path")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, per actor and in the baseline")
    args = parser.parse_args()

    import ray

    from newsclip import config
    from newsclip.demo.data import write_demo_data
    from newsclip.demo.model import ensure_demo_model
    from newsclip.encode import IMAGES, encode_side
    from newsclip.pipeline import ensure_ray
    from newsclip.prepare import run as prepare
    from newsclip.store import parquet_files

    if args.backbone == "demo-tiny":
        ensure_demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_data(tmp / "data", articles=round(args.images / 1.05), seed=7)  # + 5% orphan images
        cfg = config.load(None, [f"input.articles={tmp / 'data' / 'articles'}",
                                 f"input.images={tmp / 'data' / 'images'}", f"output_dir={tmp / 'out'}",
                                 "eval.sample_size=null", "eval.candidates=all", f"backbones=[{args.backbone}]",
                                 f"encode.batch_size={args.batch_size}", f"encode.actors={args.actors}",
                                 f"encode.torch_threads={args.threads}",
                                 f"encode.num_cpus_per_actor={args.cpus_per_actor}"])
        prepare(cfg)
        ensure_ray(cfg.ray)
        started = time.perf_counter()
        entry = encode_side(cfg, args.backbone, IMAGES)
        ray_seconds = time.perf_counter() - started

        (tmp / "plain").mkdir()
        started = time.perf_counter()
        plain_rows = plain_loop(parquet_files(cfg.input.images), args.backbone, args.batch_size, args.threads,
                                tmp / "plain")
        plain_seconds = time.perf_counter() - started
    ray.shutdown()
    result = {
        "backbone": args.backbone, "images": entry["rows"], "batch_size": args.batch_size, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
        "torch_threads": args.threads, "cpus": os.cpu_count(),
        "ray_pipeline": {"seconds": round(ray_seconds, 2), "images_per_s": round(entry["rows"] / ray_seconds, 1)},
        "plain_loop": {"seconds": round(plain_seconds, 2), "images_per_s": round(plain_rows / plain_seconds, 1)},
        "ratio_pipeline_over_plain": round((entry["rows"] / ray_seconds) / (plain_rows / plain_seconds), 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
