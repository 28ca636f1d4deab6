"""The GPU check: CUDA-marked tests, fp16/fp32/bf16 correctness of both towers (also of open_clip's SigLIP2
ViT-B/16), the encode throughput table for ViT-B/32, SigLIP2 ViT-B/16 and ViT-L/14 (random weights), the
fine-tuning step's speed and memory (ViT-B/32, batch 256, bf16), the torch kNN engine (exact top-100 at 1M x 512
and 1M x 768, a 1M x 1M search) and `newsclip serve`'s search on the GPU (1M x 768, k = 20), in one JSON. Run it through
benchmarks/gpu_check.sh.

    benchmarks/gpu_check.sh                      # on a GPU machine: the full check (under 6 minutes on one H200)
    benchmarks/gpu_check.sh --device cpu         # a dry run of every step on a CPU, at toy sizes
    benchmarks/gpu_check.sh --tiny               # every step with demo-tiny's architecture: the plumbing, fast

Needs torch, torchvision, pyarrow, pillow, Ray and clip: no polars, no faiss (the GPU machine has neither).
Every step is guarded, so one failure does not lose the others; the JSON is rewritten after each step. The exit
status is 1 when any step recorded an error (each is named on stderr), so a broken step never passes for a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# (backbone, extra benchmark flags): decode on CPU tasks as the paper does, then the faster options for the light
# backbone, which is decode-bound on 16 CPUs (one H200, 2026-11-28: 2,337/s with a DataLoader, 21,520/s model only)
# and one open_clip model (issue 25): SigLIP2 ViT-B/16 with random weights, its own squash resize and mean/std
OPEN_CLIP = "ViT-B-16-SigLIP2"
THROUGHPUT = [("ViT-B/32", []), ("ViT-B/32", ["--jpeg-draft"]), ("ViT-B/32", ["--decode", "gpu"]), (OPEN_CLIP, []),
              ("ViT-L/14", [])]
DRY_RUN = ["--images", "32", "--texts", "32", "--batch-size", "16", "--photo-size", "320x213"]  # ViT-L/14 left out:
# on two CPU cores its three model loads alone take minutes
TINY = "demo-tiny"  # --tiny: newsclip's own small CLIP (random weights) in place of every backbone above
OPEN_CLIP_TINY = "ViT-S-32"  # --tiny: open_clip's smallest ViT (its own tokenizer: no Hub files) for the open_clip row
STEPS = ("cuda_tests", "correctness", "throughput", "finetune", "knn", "serve", "bars")
# the knn step (issue 27): database rows, timed queries and widths on a GPU, and in a dry run; the bars it is held to
KNN_FULL = {"rows": 1_000_000, "queries": 200_000, "dims": (512, 768), "all_against_all": 768}
KNN_DRY = {"rows": 4000, "queries": 1000, "dims": (64,), "all_against_all": 64}
KNN_BARS = {"queries_per_s_at_768": 100_000, "all_against_all_s": 60}
KNN_CHECKED = 100  # queries whose rankings are checked against a float64 reference on the CPU
# the serve step: `newsclip serve`'s search of one side on the GPU against the CPU's pass, k = 20
SERVE_FULL = {"rows": 1_000_000, "dim": 768, "queries": 200, "cpu_queries": 8}
SERVE_DRY = {"rows": 4000, "dim": 64, "queries": 20, "cpu_queries": 8}
FAIL = "NEWSCLIP_GPU_CHECK_FAIL"  # a step's name: that step raises at once (to test that a failure is reported)


def correctness(device: str, backbone: str = "ViT-B/32") -> dict:
    """Each precision's text and image embeddings against the fp32 CPU reference, and the recipe that crashed."""
    import numpy as np
    import pyarrow as pa
    import torch
    from random_clip import random_checkpoint

    from newsclip.config import EncodeConfig
    from newsclip.retrieval.backbones import input_sizes
    from newsclip.workers.encoders import ImageEncoder, TextEncoder, decode_images, tokenize_texts

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(random_checkpoint(backbone, Path(tmp) / "random.pt"))
        resolution, context_length = input_sizes(checkpoint)
        import encode_throughput

        photos = [encode_throughput.photo(i, 800, 533, 85) for i in range(8)]
        decoded = decode_images(pa.table({"image": pa.array(photos, pa.binary())}), resolution=resolution,
                                max_pixels=40_000_000, draft=False, jpeg_to_actor=False)
        jpegs = decode_images(pa.table({"image": pa.array(photos, pa.binary())}), resolution=resolution,
                              max_pixels=40_000_000, draft=False, jpeg_to_actor=True)
        tokens = tokenize_texts(pa.table({"hash": [str(i) for i in range(8)],
                                          "query_text": encode_throughput.texts(8)}), context_length)

        def vectors(table):
            return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)

        def agreement(got, side: str) -> dict:
            # random weights map every input to nearly the same direction, so a plain cosine says little; the
            # cosine after removing the reference's mean compares what tells one input from another
            want = reference[side]
            centred = [v - want.mean(0) for v in (got, want)]
            centred = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in centred]
            return {f"{side}_min_cosine": round(float(np.min(np.sum(got * want, 1))), 5),
                    f"{side}_min_centred_cosine": round(float(np.min(np.sum(centred[0] * centred[1], 1))), 4)}

        cpu = EncodeConfig(batch_size=8).for_backbone(backbone)
        reference = {"images": vectors(ImageEncoder(checkpoint, cpu)(decoded)),
                     "texts": vectors(TextEncoder(checkpoint, cpu)(tokens))}
        gpus = 1 if device == "cuda" else 0
        for precision in ("fp16", "fp32", "bf16"):
            cfg = EncodeConfig(batch_size=8, num_gpus_per_actor=gpus, precision=precision).for_backbone(backbone)
            try:
                images, texts = ImageEncoder(checkpoint, cfg), TextEncoder(checkpoint, cfg)
                out[precision] = {"label": images.precision, "device": images.device,
                                  **agreement(vectors(images(decoded)), "images"),
                                  **agreement(vectors(texts(tokens)), "texts")}
                if precision == "fp16":
                    gpu_decode = ImageEncoder(checkpoint, EncodeConfig(batch_size=8, num_gpus_per_actor=gpus,
                                                                       decode="gpu").for_backbone(backbone))
                    out["fp16"]["gpu_decode"] = agreement(vectors(gpu_decode(jpegs)), "images")
            except Exception as e:  # noqa: BLE001 - the check reports, it does not stop
                out[precision] = {"error": f"{type(e).__name__}: {e}"}
        try:
            out[OPEN_CLIP] = open_clip_agreement(device, OPEN_CLIP_TINY if backbone == TINY else OPEN_CLIP, photos)
        except Exception as e:  # noqa: BLE001
            out[OPEN_CLIP] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        model = torch.load(checkpoint, weights_only=True)
        from clip.model import build_model

        half = build_model(model).to(device).half()  # the recipe of old: it must fail, clip's own must not
        try:
            half.encode_text(torch.from_numpy(np.asarray(tokens.column("tokens").to_pylist())).to(device))
            out["model_half_recipe"] = "ran"
        except RuntimeError as e:
            out["model_half_recipe"] = f"fails as expected: {str(e)[:80]}"
    return out


def open_clip_agreement(device: str, name: str, photos: list[bytes]) -> dict:
    """An open_clip model with random weights (resolved as a job resolves a weights file): each precision's image
    embeddings (its own resize, on CPU tasks and with nvjpeg) and text embeddings (random tokens: its Hub tokenizer
    need not be here) against fp32 on the CPU."""
    import numpy as np
    import pyarrow as pa
    from random_clip import random_open_clip

    from newsclip.config import EncodeConfig
    from newsclip.workers.encoders import ImageEncoder, TextEncoder, decode_images

    with tempfile.TemporaryDirectory() as tmp:
        backbone = random_open_clip(name, Path(tmp))
        images = pa.table({"image": pa.array(photos, pa.binary())})
        decoded, jpegs = (decode_images(images, backbone.image_size[0], 40_000_000, False, gpu,
                                        preprocess=backbone.preprocess) for gpu in (False, True))
        rng = np.random.default_rng(0)
        tokens = rng.integers(1, 1000, (len(photos), backbone.context_length)).astype(np.int32)
        tokens = pa.table({"hash": [str(i) for i in range(len(photos))],
                           "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)),
                                                                       backbone.context_length)})

        def vectors(table):
            return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)

        cpu = EncodeConfig(batch_size=8).for_backbone(name, backbone.image_gflops)
        want = {"images": vectors(ImageEncoder(backbone, cpu)(decoded)),
                "texts": vectors(TextEncoder(backbone, cpu)(tokens))}
        out: dict = {"backbone": name, "preprocess": backbone.preprocess.describe()}
        gpus = 1 if device == "cuda" else 0
        for precision in ("fp16", "fp32", "bf16"):
            cfg = EncodeConfig(batch_size=8, num_gpus_per_actor=gpus, precision=precision).for_backbone(
                name, backbone.image_gflops)
            try:
                image_encoder = ImageEncoder(backbone, cfg)
                got = {"images": vectors(image_encoder(decoded)),
                       "texts": vectors(TextEncoder(backbone, cfg)(tokens))}
                out[precision] = {"label": image_encoder.precision, **{
                    f"{side}_min_cosine": round(float(np.min(np.sum(got[side] * want[side], 1))), 5)
                    for side in got}}
                if precision == "fp16":
                    gpu = ImageEncoder(backbone, EncodeConfig(batch_size=8, num_gpus_per_actor=gpus, decode="gpu")
                                       .for_backbone(name, backbone.image_gflops))
                    out["fp16"]["gpu_decode_images_min_cosine"] = round(float(np.min(np.sum(
                        vectors(gpu(jpegs)) * want["images"], 1))), 5)
            except Exception as e:  # noqa: BLE001 - the check reports, it does not stop
                out[precision] = {"error": f"{type(e).__name__}: {e}"}
    return out


def cuda_tests() -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed here"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                          "tests/test_encoders.py"], cwd=HERE.parent, capture_output=True, text=True)
    return {"exit_status": run.returncode, "summary": run.stdout.strip().splitlines()[-1:], "stderr": run.stderr[-500:]}


def throughput(device: str, tiny: bool = False) -> list[dict]:
    import encode_throughput

    full = device == "cuda" and not tiny
    rows = []
    for i, (backbone, flags) in enumerate(THROUGHPUT if full else THROUGHPUT[:-1]):
        backbone = (OPEN_CLIP_TINY if backbone == OPEN_CLIP else TINY) if tiny else backbone
        sizes = ["--images", "8192", "--texts", "16384"] if full else DRY_RUN
        # on CPUs the first row of a dry run runs the stage's Ray pool as a GPU does; the others (and every --tiny
        # row) encode their few rows in this process with the pool's own code (the tasks' function, the actor's
        # class), which saves a minute of actor start-ups a row on two cores
        inline = ["--inline-rows", "1000"] if device == "cpu" and (i or tiny) else []
        argv = ["--backbone", backbone, "--random-weights", "--device", device, *sizes, *inline, *flags]
        started = time.time()
        try:
            result = encode_throughput.main(argv)
        except Exception as e:  # noqa: BLE001
            result = {"backbone": backbone, "flags": flags, "error": f"{type(e).__name__}: {e}",
                      "trace": traceback.format_exc()[-1500:]}
        result["flags"], result["wall_seconds"] = flags, round(time.time() - started, 1)
        rows.append(result)
    return rows


def finetune(device: str, tiny: bool = False) -> dict:
    """newsclip finetune's training step: steps and images per second, peak GPU memory (issue 14)."""
    import finetune_throughput

    argv = (["--backbone", "ViT-B/32", "--batch-size", "256", "--precision", "bf16"] if device == "cuda" and not tiny
            else ["--backbone", TINY, "--batch-size", "16", "--steps", "3", "--warmup", "1"])
    return finetune_throughput.main([*argv, "--device", device])


def knn(device: str, tiny: bool = False) -> dict:
    """The torch kNN engine (`knn.engine: torch`, one shard on the device): exact top-100 queries per second at each
    width over CLIP-shaped synthetic embeddings (the texts of the database's own images as queries), a search of
    every row against all of them, and KNN_CHECKED queries' rankings against float64 products on the CPU (the ids,
    ordered by score then id, must be the same: an error otherwise)."""
    import numpy as np
    import synthetic_embeddings

    from newsclip.retrieval import torch_search
    from newsclip.retrieval.search import Index, KnnConfig

    torch_search.GPU_RECIPE_ON_CPU = device == "cpu"  # a dry run rehearses the GPU's recipe: fp16, float64 re-scores
    size = KNN_FULL if device == "cuda" and not tiny else KNN_DRY
    n, k = size["rows"], 100
    cfg = KnnConfig(k=k, engine="torch", num_gpus_per_actor=1 if device == "cuda" else 0,
                    query_batch_size=8192 if device == "cuda" else 256)
    ids = np.arange(n)  # numbers: their order is the rows' order
    out: dict = {"rows": n, "k": k, "engine": "torch", "bars": KNN_BARS if size is KNN_FULL else None}
    for dim in dict.fromkeys([*size["dims"], size["all_against_all"]]):
        texts, images, _ = synthetic_embeddings.pairs(0, n, dim, device=device)
        texts, images = texts.cpu().numpy(), images.cpu().numpy()
        started = time.perf_counter()
        with Index(ids, images, cfg) as index:
            built = time.perf_counter()
            row = {"build_s": round(built - started, 2), **{key: index.shard_stats[0].get(key)
                                                             for key in ("device", "products", "gpu")}}
            if dim in size["dims"]:
                queries = texts[: size["queries"]]
                index.search(queries[: cfg.query_batch_size])  # warm-up: kernels, allocator
                started = time.perf_counter()
                keys, scores = index.search(queries)
                seconds = time.perf_counter() - started
                row.update(queries=len(queries), search_s=round(seconds, 2),
                           queries_per_s=round(len(queries) / seconds))
                row["rankings_equal_reference"] = _reference_equal(images, texts[:KNN_CHECKED], keys, k)
                if not row["rankings_equal_reference"]:
                    row["error"] = (f"the torch engine's top-{k} of {KNN_CHECKED} queries differ from float64 "
                                    "products on the CPU")
                out[f"dim_{dim}"] = row
            if dim == size["all_against_all"]:
                started = time.perf_counter()
                index.search(texts)
                out["all_against_all"] = {"rows": n, "queries": n, "dim": dim,
                                          "seconds": round(time.perf_counter() - started, 1)}
        del texts, images
    return out


def serve(device: str, tiny: bool = False) -> dict:
    """`newsclip serve`'s search where the replica has a GPU: a side's rows searched there by the knn stage's torch
    engine (`Side.on_gpu`), one query at a time (what a request waits for) and 64 together, against the CPU's pass
    over the same rows, whose answers (ids, scores, order) must be the same. A dry run runs the GPU's recipe on the
    CPU."""
    import numpy as np
    import synthetic_embeddings

    from newsclip.retrieval import search, torch_search
    from newsclip.serve.index import Side

    size, k = SERVE_FULL if device == "cuda" and not tiny else SERVE_DRY, 20
    texts, images, _ = synthetic_embeddings.pairs(0, size["rows"], size["dim"], device=device)
    queries, images = texts.cpu().numpy()[: size["queries"]], images.cpu().numpy()
    cpu = Side.from_arrays(np.array([f"img-{i:09d}" for i in range(len(images))], object), images)
    del texts, images
    if device == "cuda":
        gpu = cpu.on_gpu()
    else:
        torch_search.GPU_RECIPE_ON_CPU = True
        gpu = dataclasses.replace(cpu, gpu=search._Shard(cpu.vectors, 0, search.KnnConfig(engine="torch")))
    out = {"rows": len(cpu.ids), "dim": size["dim"], "k": k, "device": gpu.device,
           "products": gpu.gpu.rows.info["products"] if gpu.gpu is not None else None}
    if gpu.gpu is None:
        return {**out, "error": "the side stayed on the CPU (no GPU, or no room on it)"}
    gpu.nearest(queries[:64], k)  # warm-up: kernels, the allocator
    alone = []
    for q in queries:
        started = time.perf_counter()
        gpu.nearest(q[None], k)
        alone.append(time.perf_counter() - started)
    started = time.perf_counter()
    for s in range(0, len(queries), 64):
        gpu.nearest(queries[s : s + 64], k)
    together = (time.perf_counter() - started) / len(range(0, len(queries), 64))
    checked = queries[: size["cpu_queries"]]
    started = time.perf_counter()
    want = [cpu.nearest(q[None], k)[0] for q in checked]
    cpu_ms = (time.perf_counter() - started) / len(checked) * 1e3
    out.update(gpu_ms_p50=round(float(np.median(alone)) * 1e3, 3), gpu_ms_p99=round(
        float(np.quantile(alone, 0.99)) * 1e3, 3), gpu_ms_per_64=round(together * 1e3, 3), cpu_ms=round(cpu_ms, 1),
        answers_equal=gpu.nearest(checked, k) == want)
    if not out["answers_equal"]:
        out["error"] = f"the GPU's answers to {len(checked)} queries differ from the CPU pass's"
    return out


def _reference_equal(db, queries, keys, k: int) -> bool:
    """Whether `keys` (rows, as ids are row numbers) of `queries` are their top-k by float64 products rounded to
    float32, ordered by score desc then row asc."""
    import numpy as np

    scores = np.concatenate([(queries.astype(np.float64) @ db[s : s + 65536].astype(np.float64).T).astype(np.float32)
                             for s in range(0, len(db), 65536)], axis=1)
    rows = np.arange(scores.shape[1])
    for query, got in zip(scores, keys):
        kth = np.partition(query, len(query) - k)[len(query) - k]
        near = np.flatnonzero(query >= kth)
        want = near[np.lexsort((rows[near], -query[near]))][:k]
        if not np.array_equal(want, got[: len(want)]):
            return False
    return True


def bars(result: dict) -> dict:
    """Issue 11's GPU bars, read off this run (only meaningful on a GPU): per backbone, its fastest row."""
    rows = [r for r in result.get("throughput", []) if "error" not in r]
    out = {}
    for name in dict.fromkeys(r["backbone"] for r in rows):
        # by the steady rate where there is one (a dry run's few rows arrive in one batch: none)
        r = max((r for r in rows if r["backbone"] == name),
                key=lambda r: r["newsclip_stage"]["steady_rows_per_s"] or r["newsclip_stage"]["rows_per_s"])
        steady, overall = r["newsclip_stage"]["steady_rows_per_s"], r["newsclip_stage"]["rows_per_s"]
        out[name] = {"flags": r["flags"], "steady_images_per_s": steady, "images_per_s_with_startup": overall,
                     "over_dataloader": r["ratios"].get("stage_over_dataloader_loop"),
                     "over_model_only_steady": round(steady / r["model_only"]["images_per_s"], 3)
                     if steady and "model_only" in r else None,
                     "texts_steady_per_s": r.get("newsclip_stage_texts", {}).get("steady_rows_per_s")}
    goals = {"ViT-B/32": 5000, "ViT-L/14": 1500}
    for name, goal in goals.items():
        if name in out:
            out[name]["goal_images_per_s"] = goal
    return out


def failures(result: dict) -> list[str]:
    """Every error the steps recorded, each as 'where: error' (a step's own, a throughput row's, a precision's), a
    CUDA test run that did not pass, and a throughput table that gave no bar."""
    found = []

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            if "error" in value:
                found.append(f"{where}: {value['error']}")
                return
            for key, inner in value.items():
                walk(inner, f"{where}.{key}")
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                label = (f" ({' '.join([inner['backbone'], *inner.get('flags', [])])})"
                         if isinstance(inner, dict) and "backbone" in inner else "")
                walk(inner, f"{where}[{i}]{label}")

    for step in STEPS:
        if step in result:
            walk(result[step], step)
    tests = result.get("cuda_tests", {})
    if tests.get("exit_status") not in (None, 0):
        found.append(f"cuda_tests: pytest exited {tests['exit_status']}: {tests.get('summary')} "
                     f"{tests.get('stderr', '')[-300:]}")
    throughput_ran = isinstance(result.get("throughput"), list) and result["throughput"]
    if throughput_ran and result.get("bars") == {}:
        found.append("bars: none computed from the throughput table")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when torch sees one")
    parser.add_argument("--tiny", action="store_true",
                        help=f"{TINY}'s architecture (random weights) in place of every backbone, at the dry run's "
                             "sizes, and on CPUs no actor pool: each step's plumbing in about a minute (on a GPU "
                             "too, before the full check)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"the steps to run, comma-separated, of {','.join(STEPS)} (default: all)")
    parser.add_argument("out", nargs="?", type=Path, help="the JSON (default benchmarks/results/gpu_check-<time>.json)")
    args = parser.parse_args()
    steps = set(filter(None, args.steps.split(",")))
    if steps - set(STEPS):
        parser.error(f"--steps: {', '.join(sorted(steps - set(STEPS)))} is not a step; the steps: {', '.join(STEPS)}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or HERE / "results" / f"gpu_check-{device}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    "torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "tiny": args.tiny, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run = {"cuda_tests": cuda_tests, "correctness": lambda: correctness(device, TINY if args.tiny else "ViT-B/32"),
           "throughput": lambda: throughput(device, args.tiny), "finetune": lambda: finetune(device, args.tiny),
           "knn": lambda: knn(device, args.tiny), "serve": lambda: serve(device, args.tiny),
           "bars": lambda: bars(result)}
    for name in (s for s in STEPS if s in steps):
        started = time.time()
        try:
            if os.environ.get(FAIL) == name:
                raise RuntimeError(f"a failure injected by {FAIL}={name}")
            result[name] = run[name]()
        except Exception as e:  # noqa: BLE001 - keep going: one broken step must not lose the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        result.setdefault("seconds", {})[name] = round(time.time() - started, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"gpu_check {name}: {json.dumps(result[name])[:400]}", flush=True)
    print(f"gpu_check: wrote {out}")
    problems = failures(result)
    for problem in problems:
        print(f"gpu_check: FAILED {problem}", file=sys.stderr)
    if problems:
        print(f"gpu_check: {len(problems)} failure(s), each with its trace in {out}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
