"""How far the faster decoding options move pixels, embeddings and MRR from clip's own CPU preprocess; prints JSON.

    .venv/bin/python benchmarks/preprocess_fidelity.py [--articles 2000] [--image-size 512]

Writes demo data with scenes rendered at --image-size (photo-sized JPEGs, so that draft decoding has something
to skip), then runs the demo job (translation off) once per option, sharing one embedding store, so the texts are
encoded once:
  exact         encode.decode: cpu (PIL + clip's preprocess: the paper's, the default)
  draft         encode.jpeg_draft: true (PIL decodes JPEGs at a reduced DCT scale first)
  actor_decode  encode.decode: gpu (torchvision's decode_jpeg + torch's resize/crop in the model actor; on this
                CPU machine libjpeg stands in for nvjpeg, whose IDCT differs slightly again)
For each option: mean absolute pixel difference against exact (uint8, over the sampled images), the cosine of its
image embeddings with exact's (demo-tiny), MRR@100 with its 95% interval, and the paired bootstrap interval of its
MRR minus exact's over the same queries. An option could become the default only where that difference is
within the bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"exact": [], "draft": ["encode.jpeg_draft=true"], "actor_decode": ["encode.decode=gpu"]}


def reciprocal_ranks(out: Path) -> dict[str, float]:
    """article_id -> 1/rank of its own image in its text_to_image ranking (0 outside the top k)."""
    import pyarrow.parquet as pq

    from newsclip.runtime.layout import Layout

    layout = Layout(out)
    truth = pq.read_table(layout.prepared.queries, columns=["article_id", "image_id"]).to_pydict()
    truth = dict(zip(truth["article_id"], truth["image_id"]))
    ranked = pq.read_table(layout.rankings_parquet("demo-tiny"), columns=["article_id", "image_ids"]).to_pydict()
    return {a: next((1 / (r + 1) for r, i in enumerate(ids) if i == truth[a]), 0.0)
            for a, ids in zip(ranked["article_id"], ranked["image_ids"])}


def pixels(datas: list[bytes], option: str, resolution: int):
    import numpy as np
    import pyarrow as pa

    from newsclip.workers.encoders import decode_images, decode_jpegs

    if option == "actor_decode":
        return np.stack([t.numpy() for t in decode_jpegs(datas, resolution, "cpu")])
    table = decode_images(pa.table({"image": pa.array(datas, pa.binary())}), resolution=resolution,
                          max_pixels=40_000_000, draft=option == "draft", jpeg_to_actor=False)
    return np.stack([np.frombuffer(p, np.uint8).reshape(3, resolution, resolution)
                     for p in table.column("pixels").to_pylist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from newsclip.cli import main as newsclip
    from newsclip.demo.data import write_demo_data
    from newsclip.demo.model import ensure_demo_model
    from newsclip.runtime.layout import Layout
    from newsclip.runtime.store import read_embeddings, read_manifest

    ensure_demo_model()
    result: dict = {"articles": args.articles, "image_size": args.image_size, "options": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_data(tmp / "data", args.articles, seed=0, image_size=args.image_size)
        runs = {}
        for option, settings in OPTIONS.items():
            out = tmp / option
            argv = ["run", str(REPO / "jobs" / "demo.yaml"), "--set", f"input.articles={tmp / 'data' / 'articles'}",
                    "--set", f"input.images={tmp / 'data' / 'images'}", "--set", f"output_dir={out}",
                    "--set", f"store_dir={tmp / 'store'}", "--set", "translate.enabled=false"]
            for setting in settings:
                argv += ["--set", setting]
            if newsclip(argv) != 0:
                sys.exit(f"the demo job failed with {settings}")
            runs[option] = out

        exact_rr = reciprocal_ranks(runs["exact"])
        queries = sorted(exact_rr)
        rng = np.random.default_rng(0)
        resamples = rng.integers(0, len(queries), (args.bootstrap, len(queries)))
        exact = Layout(runs["exact"])
        ids, exact_vectors = read_embeddings(exact.embeddings_of("demo-tiny", "images"), "image_id")
        candidates = pq.read_table(exact.prepared.candidates).filter(pc.field("candidate"))
        files = sorted(set(candidates.column("file").to_pylist()))
        images = pq.read_table(files, columns=["image_id", "image"])
        images = images.filter(pc.is_in(images.column("image_id"), value_set=candidates.column("image_id")))
        jpegs = [d for d in images.column("image").to_pylist() if d[:3] == b"\xff\xd8\xff"][:500]
        reference = pixels(jpegs, "exact", 64).astype(np.int16)
        for option, out in runs.items():
            rr = reciprocal_ranks(out)
            a = np.array([rr[q] for q in queries])
            b = np.array([exact_rr[q] for q in queries])
            means = a[resamples].mean(1)
            differences = (a - b)[resamples].mean(1)
            option_ids, vectors = read_embeddings(Layout(out).embeddings_of("demo-tiny", "images"), "image_id")
            order = {i: k for k, i in enumerate(option_ids)}
            cosines = np.array([vectors[order[i]] @ exact_vectors[k] for k, i in enumerate(ids) if i in order])
            result["options"][option] = {
                "pixel_mean_abs_difference": round(float(np.abs(pixels(jpegs, option, 64) - reference).mean()), 3),
                "embedding_cosine_mean": round(float(cosines.mean()), 5),
                "embedding_cosine_min": round(float(cosines.min()), 5),
                "mrr": round(float(a.mean()), 4),
                "mrr_95": [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)],
                "mrr_minus_exact": round(float(a.mean() - b.mean()), 4),
                "mrr_minus_exact_95": [round(float(np.percentile(differences, 2.5)), 4),
                                       round(float(np.percentile(differences, 97.5)), 4)],
                "queries": len(queries),
                "encode_seconds": read_manifest(out)["stages"]["encode:demo-tiny:images"].get("seconds"),
            }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
