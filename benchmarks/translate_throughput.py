"""Articles per second of the translate stage against Argos' own per-text `translate`; prints JSON.

    .venv/bin/python benchmarks/translate_throughput.py --articles 500 [--package PATH] [--threads 1]

All runs translate the same German demo articles (title + 4-sentence body) with the demo de->en package:
  argos_loop:   argostranslate's PackageTranslation.translate per title and per body (its public path)
  stage_cold:   Translator.__call__ on batches of --batch-rows articles, empty cache (one translate_batch per batch)
  stage_cached: the same batches again through a new Translator on the same cache (a nightly rerun)
Without --package the demo translator is built first (about 2 minutes, not timed) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def demo_articles(n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    from newsclip.demo import news
    from newsclip.demo.scenes import Scene

    rng = np.random.default_rng([seed, 77])
    rows = []
    for i in range(n):
        a = news.article(Scene.sample(rng), rng)
        rows.append({"article_id": f"a{i}", "title": a["title"][1], "text": a["text"][1], "lang": "de",
                     "title_ref": a["title"][0], "text_ref": a["text"][0]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=500)
    parser.add_argument("--package", type=Path, help="a de->en .argosmodel (default: build the demo one)")
    parser.add_argument("--threads", type=int, default=1, help="CTranslate2 intra-op threads")
    parser.add_argument("--batch-rows", type=int, default=64, help="articles per stage batch")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per CTranslate2 batch")
    args = parser.parse_args()

    import numpy as np

    from newsclip.translate.demo_translator import build_demo_translator
    from newsclip.translate.packages import import_argos, install_packages
    from newsclip.translate.translator import TranslateConfig, Translator

    work = Path(tempfile.mkdtemp(prefix="newsclip-translate-bench-"))
    packages_dir = work / "packages"
    import_argos(packages_dir, "cpu", args.threads, also=("translate",))
    package = args.package or build_demo_translator(work / "build", log=lambda m: None)
    install_packages([package], packages_dir)
    rows = demo_articles(args.articles)
    batches = []
    for start in range(0, len(rows), args.batch_rows):
        chunk = rows[start:start + args.batch_rows]
        batch = {}
        for key in ("article_id", "title", "text", "lang"):
            batch[key] = np.empty(len(chunk), dtype=object)
            batch[key][:] = [r[key] for r in chunk]
        batches.append(batch)
    result: dict = {"articles": len(rows), "threads": args.threads, "batch_rows": args.batch_rows,
                    "batch_size": args.batch_size, "package": str(package), "cpus": os.cpu_count()}

    from argostranslate.package import get_installed_packages
    from argostranslate.translate import Language, PackageTranslation

    (pkg,) = get_installed_packages([packages_dir])
    argos = PackageTranslation(Language("de", "German"), Language("en", "English"), pkg)
    argos.translate("Nachrichten aus Berlin")  # load the model outside the clock, as the stage does in __init__
    t0 = time.perf_counter()
    argos_out = [(argos.translate(r["title"]), argos.translate(r["text"])) for r in rows]
    result["argos_loop"] = {"seconds": round(time.perf_counter() - t0, 2)}

    cfg = TranslateConfig(packages_dir=str(packages_dir), threads=args.threads, batch_size=args.batch_size,
                          cache_dir=str(work / "cache"))
    for label in ("stage_cold", "stage_cached"):
        stage = Translator(cfg)
        stage.translate_texts("de", ["Nachrichten aus Berlin"])  # load the package outside the clock
        stage.stats.clear()
        t0 = time.perf_counter()
        outs = [stage(b) for b in batches]
        seconds = time.perf_counter() - t0
        title_en = [t for o in outs for t in o["title_en"]]
        text_en = [t for o in outs for t in o["text_en"]]
        result[label] = {"seconds": round(seconds, 2), "stats": dict(stage.stats), "splitter": stage.splitters}
        if label == "stage_cold":
            result["same_as_argos"] = float(np.mean([(a, b) == o for a, b, o in zip(title_en, text_en, argos_out)]))
            result["exact_vs_reference"] = float(np.mean(
                [(a, b) == (r["title_ref"], r["text_ref"]) for a, b, r in zip(title_en, text_en, rows)]))
    for label in ("argos_loop", "stage_cold", "stage_cached"):
        result[label]["articles_per_s"] = round(len(rows) / max(result[label]["seconds"], 1e-9), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
