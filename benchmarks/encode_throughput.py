"""Images (and texts) per second of newsclip's encode stage against a plain PyTorch loop and the model alone, on the
same news-photo-like JPEGs in one run; prints JSON (and writes it with --out).

    .venv/bin/python benchmarks/encode_throughput.py --images 8000                       # demo-tiny on this CPU
    python3 benchmarks/encode_throughput.py --backbone ViT-B/32 --random-weights --device cuda --images 8192

What is timed, each over the same Parquet shards of JPEGs (800x533, quality 85 by default):
  newsclip_stage   the encode stage's own path on the rows it picks itself (encoding.wanted_rows, from inputs written
                   as the stages before it commit them): CPU decode tasks -> model actors -> the store
                   (encoding.encode_new) on Ray, unless --inline-rows lets it encode a small todo in this process;
                   start-up (actors, model loads, first inputs) is its first_batch_seconds, and the steady rate counts
                   the rows after the first batch (none when the first batch held them all). Ray itself is started
                   before the clock.
  plain_loop       one process: read, PIL decode, clip's preprocess, model, in batches (only with --device cpu: on a
                   GPU machine it measures one core's decoding)
  dataloader_loop  torch DataLoader with CPUs - 1 workers (PIL decode + clip's preprocess), pinned memory on a GPU:
                   the clip-retrieval style baseline
  model_only       the model on already-preprocessed pixels: the ceiling
Nothing here needs polars or faiss, so it runs on the GPU machine's package set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from random_clip import is_open_clip_arch, random_checkpoint, random_open_clip  # noqa: E402

SHARD_ROWS = 512
BASE_PHOTOS = 64  # distinct photos; every row gets its own bytes (a tail after the JPEG's end marker)


def photo(seed: int, width: int, height: int, quality: int) -> bytes:
    """A news-photo-like JPEG: smooth shapes of colour plus grain; at 800x533 q85 about as large as a real one."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 9, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_photos(folder: Path, n: int, width: int, height: int, quality: int) -> list[Path]:
    """`n` unique JPEGs (content hashes differ, so the stage encodes every one) in shards of SHARD_ROWS."""
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    with ProcessPoolExecutor() as pool:
        bases = list(pool.map(photo, range(BASE_PHOTOS), [width] * BASE_PHOTOS, [height] * BASE_PHOTOS,
                              [quality] * BASE_PHOTOS))
    folder.mkdir(parents=True)
    files = []
    for start in range(0, n, SHARD_ROWS):
        rows = range(start, min(n, start + SHARD_ROWS))
        table = pa.table({"image_id": [f"img-{i:07d}" for i in rows],
                          "image": pa.array([bases[i % BASE_PHOTOS] + f"row {i}".encode() for i in rows],
                                            pa.binary())})
        files.append(folder / f"part-{start // SHARD_ROWS:05d}.parquet")
        pq.write_table(table, files[-1])
    return files


def write_texts(folder: Path, n: int) -> list[Path]:
    """`n` query texts as the translate stage commits them, (article_id, query_text) in shards of SHARD_ROWS: the
    stage's CPU tasks read them from there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    queries, files = texts(n), []
    for start in range(0, n, SHARD_ROWS):
        rows = range(start, min(n, start + SHARD_ROWS))
        files.append(folder / f"part-{start // SHARD_ROWS:05d}.parquet")
        pq.write_table(pa.table({"article_id": [str(i) for i in rows], "query_text": queries[start:rows.stop]}),
                       files[-1])
    return files


def write_candidates(path: Path, files: list[Path]) -> Path:
    """The image shards' rows as the prepare stage lists its candidates: (image_id, file, image_hash, candidate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from newsclip.runtime.embedding_store import content_keys

    parts = []
    for f in files:
        shard = pq.read_table(f, columns=["image_id", "image"])
        parts.append(pa.table({"image_id": shard.column("image_id"), "file": pa.array([str(f)] * len(shard)),
                               "image_hash": content_keys(shard.column("image").to_pylist()),
                               "candidate": pa.array([True] * len(shard))}))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(parts), path)
    return path


def texts(n: int) -> list[str]:
    """`n` distinct English title+body texts of the demo's kind (~70 words: cut at 77 tokens, as news is)."""
    import numpy as np

    from newsclip.demo.news import article
    from newsclip.demo.scenes import Scene

    rng = np.random.default_rng(0)
    parts = (article(Scene.sample(rng), rng) for _ in range(n))
    return [f"{p['title'][0]} {p['text'][0]} ({i})" for i, p in enumerate(parts)]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def load_model(checkpoint, device: str):
    """The model as the stage's actors run it: clip's mixed fp16 (open_clip's own fp16 for an open_clip backbone,
    a ResolvedBackbone) on a GPU, fp32 on a CPU, and its preprocess."""
    from newsclip.workers.encoders import apply_open_clip_precision, apply_precision

    precision = "fp16" if device == "cuda" else "fp32"
    if not isinstance(checkpoint, str):
        from open_clip.transform import image_transform

        from newsclip.retrieval.registry import load_model as load

        p = checkpoint.preprocess
        return apply_open_clip_precision(load(checkpoint), precision, device), image_transform(
            p.size, is_train=False, mean=p.mean, std=p.std, resize_mode=p.resize_mode, interpolation=p.interpolation)
    from newsclip.retrieval.backbones import load_backbone

    model, preprocess = load_backbone(checkpoint, "cpu")
    return apply_precision(model, precision, device), preprocess


def input_dtype(model, device: str):
    """What the model's images are cast to: clip's `model.dtype`; for open_clip models what its precision gives."""
    import torch

    return getattr(model, "dtype", None) or (torch.float16 if device == "cuda" else torch.float32)


class _Photos:
    """A map-style dataset of (decoded, preprocessed) photos, for the DataLoader baseline."""

    def __init__(self, files: list[Path], preprocess):
        import pyarrow.parquet as pq

        self.images = [b for f in files for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from newsclip.workers.images import decode_image

        return self.preprocess(decode_image(self.images[i]))


def dataloader_loop(files: list[Path], checkpoint: str, batch: int, device: str, workers: int) -> dict:
    import torch

    model, preprocess = load_model(checkpoint, device)
    loader = torch.utils.data.DataLoader(_Photos(files, preprocess), batch_size=batch, num_workers=workers,
                                         pin_memory=device == "cuda", persistent_workers=False)
    started, done = time.perf_counter(), 0
    with torch.inference_mode():
        for pixels in loader:
            features = model.encode_image(pixels.to(device, non_blocking=True).to(input_dtype(model, device)))
            torch.nn.functional.normalize(features.float(), dim=-1).cpu()
            done += len(pixels)
    seconds = time.perf_counter() - started
    return {"workers": workers, "seconds": round(seconds, 2), "images_per_s": round(done / seconds, 1)}


def plain_loop(files: list[Path], checkpoint: str, batch: int) -> dict:
    """One process, no Ray: read, decode, preprocess, encode."""
    import pyarrow.parquet as pq
    import torch

    from newsclip.workers.images import ImageDecodeError, decode_image

    model, preprocess = load_model(checkpoint, "cpu")
    started, done = time.perf_counter(), 0
    for path in files:
        for part in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=["image"]):
            tensors = []
            for data in part.column("image").to_pylist():
                with contextlib.suppress(ImageDecodeError):
                    tensors.append(preprocess(decode_image(data)))
            with torch.inference_mode():
                torch.nn.functional.normalize(model.encode_image(torch.stack(tensors)).float(), dim=-1)
            done += len(tensors)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "images_per_s": round(done / seconds, 1)}


def model_only(checkpoint, batch: int, device: str, images: int, text_batch: int, n_texts: int) -> dict:
    """The model on ready inputs: images/s and texts/s, after a warm-up batch (an open_clip backbone's texts: random
    tokens of its context length; speed does not depend on them)."""
    import clip
    import torch

    model, _ = load_model(checkpoint, device)
    if isinstance(checkpoint, str):
        (h, w), context = (model.visual.input_resolution,) * 2, model.context_length
        tokens = clip.tokenize(texts(text_batch), context_length=context, truncate=True).to(device)
    else:
        (h, w), context = checkpoint.image_size, checkpoint.context_length
        tokens = torch.randint(1, 1000, (text_batch, context), device=device)
    pixels = torch.rand(batch, 3, h, w, device=device).to(input_dtype(model, device))
    out = {}
    with torch.inference_mode():
        for name, fn, inputs, total in (("images_per_s", model.encode_image, pixels, images),
                                        ("texts_per_s", model.encode_text, tokens, n_texts)):
            steps = max(1, total // len(inputs))
            fn(inputs)
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                fn(inputs)
            sync(device)
            out[name] = round(steps * len(inputs) / (time.perf_counter() - started), 1)
    return out


def newsclip_stage(cfg, enc, checkpoint: str, side, store_root: Path) -> dict:
    """The encode stage on one side: its own choice of the rows to encode (untimed), then its encode on Ray."""
    from newsclip.encoding import encode_new, wanted_rows
    from newsclip.runtime.embedding_store import EmbeddingStore

    _, todo = wanted_rows(cfg, side)
    store = EmbeddingStore(store_root, "bench", "random", enc.precision, side.name)
    started = time.perf_counter()
    stats = encode_new(cfg, enc, checkpoint, side, todo, store)
    seconds = time.perf_counter() - started
    steady, rest = seconds - stats["first_batch_seconds"], stats["encoded"] - stats["first_batch_rows"]
    return {"seconds": round(seconds, 2), "rows_per_s": round(stats["encoded"] / seconds, 1),
            "startup_seconds": stats["first_batch_seconds"],
            "steady_rows_per_s": round(rest / steady, 1) if rest > 0 and steady > 0 else None,
            "encoded": stats["encoded"], "in_process": stats.get("in_process", False)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--texts", type=int, default=0, help="also time the text side on this many texts")
    parser.add_argument("--backbone", default="demo-tiny",
                        help="a registry name, a checkpoint path, or an open_clip name (ARCH/TAG; with "
                             "--random-weights the architecture alone, e.g. ViT-B-16-SigLIP2)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the backbone's architecture with random weights (no download)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when torch sees one")
    parser.add_argument("--photo-size", default="800x533", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the stage's own for the backbone")
    parser.add_argument("--actors", type=int, default=1, help="model actors (one GPU each on cuda)")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="default: the stage's (0 on CPUs, 1 on GPUs)")
    parser.add_argument("--decode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--jpeg-draft", action="store_true")
    parser.add_argument("--inline-rows", type=int, default=0,
                        help="the job's ray.inline_rows: on CPUs the stage encodes a todo of at most this many rows in "
                             "this process, with the pool's own code (default 0: on Ray at every size)")
    parser.add_argument("--skip", default="", help="comma-separated: plain_loop,dataloader_loop,model_only")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    import ray
    import torch

    from newsclip import config
    from newsclip.encoding import IMAGES, TEXTS
    from newsclip.runtime.ray_setup import ensure_ray

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    width, height = map(int, args.photo_size.lower().split("x"))
    skip = set(filter(None, args.skip.split(",")))
    gpus = args.actors if device == "cuda" else 0
    # eval.candidates=all: every image written is one the stage encodes
    settings = [f"backbones=[{args.backbone}]", f"encode.actors={args.actors}", f"encode.decode={args.decode}",
                f"encode.num_gpus_per_actor={1 if gpus else 0}", f"encode.jpeg_draft={str(args.jpeg_draft).lower()}",
                "encode.commit_rows=1000000", f"ray.inline_rows={args.inline_rows}", "eval.candidates=all"]
    if args.batch_size:
        settings.append(f"encode.batch_size={args.batch_size}")
    if args.cpus_per_actor is not None:
        settings.append(f"encode.num_cpus_per_actor={args.cpus_per_actor}")
    open_clip = is_open_clip_arch(args.backbone)
    tmp_weights = Path(tempfile.mkdtemp()) if open_clip and args.random_weights else None
    resolved = None
    if open_clip:  # resolved once, as a job resolves it (random weights: saved to a file first)
        from newsclip.retrieval.registry import resolve_backbone

        resolved = random_open_clip(args.backbone, tmp_weights) if tmp_weights else resolve_backbone(args.backbone)
    enc = config.load(None, settings).encode.for_backbone(args.backbone, resolved.image_gflops if resolved else None)
    result = {"backbone": args.backbone, "random_weights": args.random_weights, "device": device,
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "cpus": os.cpu_count(),
              "torch": torch.__version__, "images": args.images, "photo": f"{width}x{height} q{args.quality}",
              "batch_size": enc.batch_size, "precision": enc.precision, "decode": enc.decode,
              "jpeg_draft": enc.jpeg_draft, "actors": args.actors,
              "cpus_per_actor": enc.num_cpus_per_actor}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if resolved is not None:
            checkpoint = resolved
        elif args.random_weights:
            checkpoint = str(random_checkpoint(args.backbone, tmp / "random.pt"))
        else:
            checkpoint = args.backbone
            if checkpoint == "demo-tiny":
                from newsclip.demo.model import ensure_demo_model

                ensure_demo_model()
        cfg = config.load(None, [*settings, f"output_dir={tmp / 'out'}"])
        started = time.perf_counter()
        files = write_photos(tmp / "images", args.images, width, height, args.quality)
        result["photo_kb"] = round(sum(f.stat().st_size for f in files) / args.images / 1024, 1)
        # the inputs as the stages before encode commit them, so that the stage picks its rows (with the shard each
        # is read from) by its own code
        write_candidates(cfg.layout.prepared.candidates, files)
        if args.texts:
            write_texts(cfg.query_texts, args.texts)
        result["data_seconds"] = round(time.perf_counter() - started, 1)

        if device == "cuda" or max(args.images, args.texts) > args.inline_rows:  # else the stage needs no Ray
            ensure_ray(cfg.ray)
        stage = result["newsclip_stage"] = newsclip_stage(cfg, enc, checkpoint, IMAGES, tmp / "store")
        if args.texts and resolved is not None and resolved.tokenizer.kind == "hf" and not resolved.tokenizer.folder:
            result["newsclip_stage_texts"] = {"skipped": "no local tokenizer for its random weights (model_only "
                                                         "times its text tower on random tokens)"}
        elif args.texts:
            result["newsclip_stage_texts"] = newsclip_stage(cfg, enc, checkpoint, TEXTS, tmp / "store")
        ray.shutdown()

        if device == "cpu" and "plain_loop" not in skip:
            result["plain_loop"] = plain_loop(files, checkpoint, enc.batch_size)
        if "dataloader_loop" not in skip:
            workers = max(1, (os.cpu_count() or 2) - 1)
            result["dataloader_loop"] = dataloader_loop(files, checkpoint, enc.batch_size, device, workers)
        if "model_only" not in skip:
            text_batch = min(1024, args.texts or 1024)
            result["model_only"] = model_only(checkpoint, enc.batch_size, device, args.images, text_batch,
                                              max(args.texts, text_batch))
    rate = stage["rows_per_s"]
    result["ratios"] = {f"stage_over_{name}": round(rate / result[name]["images_per_s"], 3)
                        for name in ("plain_loop", "dataloader_loop", "model_only") if name in result}
    if tmp_weights is not None:
        shutil.rmtree(tmp_weights, ignore_errors=True)
    if "model_only" in result and "rows_per_s" in result.get("newsclip_stage_texts", {}):
        result["ratios"]["texts_stage_over_model_only"] = round(
            result["newsclip_stage_texts"]["rows_per_s"] / result["model_only"]["texts_per_s"], 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
