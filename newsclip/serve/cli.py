"""The `newsclip search` and `newsclip serve` commands: their parsers, their runs, and what search prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from newsclip.serve.app import DEFAULT_K, MAX_K


def add_parsers(subparsers) -> None:
    """Add `newsclip search` and `newsclip serve` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "search", help="search the job's last finished run: a text (or --image) to images, and an image to articles",
        description="Answers from the job's last committed outputs (embeddings and rankings), in this process. The "
                    "query is encoded by the encode stage's own code; a text equal to an archived article's text gets "
                    "that article's stored embedding. Prints rank, image id, score and the articles using each image; "
                    "with --image also the nearest articles.")
    _job(p)
    p.add_argument("query", nargs="?", default=None, help="the text to search for (a headline, an article)")
    p.add_argument("--image", type=Path, default=None, metavar="FILE", help="search with an image file instead")
    p.add_argument("--backbone", default=None, metavar="B",
                   help="a backbone of the job, as the job or its report names it (default: its first)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"results (default {DEFAULT_K}, at most {MAX_K})")
    p.add_argument("--json", action="store_true", help="print the answer as /search's JSON")

    p = subparsers.add_parser(
        "serve", help="serve the job's index over HTTP: POST /search, GET /articles/ID, /images/ID, /healthz, "
        "and a search page at /",
        description="One ASGI app under uvicorn (on a cluster the same app runs under Ray Serve: cluster/serve.py). "
                    "It follows the job: when a run finishes, the new index is loaded beside the old and swapped in "
                    "without a restart; a failed or interrupted run leaves the old one serving. Binding to anything "
                    "but loopback requires --token (or $NEWSCLIP_TOKEN): every request must then send "
                    "`Authorization: Bearer T` (the page takes ?token=T).")
    _job(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", default=None, metavar="T",
                   help="the token requests must carry (default $NEWSCLIP_TOKEN); required off loopback")
    p.add_argument("--poll", type=float, default=None, metavar="S",
                   help="seconds between checks for a newly finished run (default 5; 0: never)")


def _job(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", type=Path, help="job file (YAML), e.g. jobs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set output_dir=out (repeatable)")


def main(args: argparse.Namespace) -> int:
    from newsclip.finetune.run import searched_job

    cfg = searched_job(args.job, args.overrides)
    if args.command == "serve":
        import os

        from newsclip.serve.app import serve

        serve(cfg, args.host, args.port, args.token or os.environ.get("NEWSCLIP_TOKEN"), args.poll)
        return 0
    return _search(cfg, args)


def _search(cfg, args: argparse.Namespace) -> int:
    from newsclip.serve.batcher import Batcher, Query
    from newsclip.serve.index import load_snapshot
    from newsclip.serve.query import QueryEncoders

    if (args.query is None) == (args.image is None):
        raise ValueError("search: give a QUERY text or --image FILE (one of them)")
    if not 1 <= args.k <= MAX_K:
        raise ValueError(f"search: --k must be from 1 to {MAX_K}")
    snap = load_snapshot(cfg)
    backbone = snap.backbone_named(args.backbone) if args.backbone else snap.default_backbone
    if backbone is None:
        raise ValueError(f"search: --backbone {args.backbone} is not in this index; it has {sorted(snap.backbones)}")
    image = args.image.read_bytes() if args.image is not None else None
    batcher = Batcher(QueryEncoders(cfg))
    try:
        images = batcher.search(Query(snap, backbone, args.k, text=args.query, image=image))
        articles = (batcher.search(Query(snap, backbone, args.k, image=image, target="articles"))
                    if image is not None and snap.backbones[backbone].texts is not None else None)
    finally:
        batcher.close()
    answer = {"backbone": backbone, "index": snap.run_id,
              "results": [{"image_id": i, "score": s, "article_ids": snap.articles.using(i)} for i, s in images]}
    if articles is not None:
        answer["articles"] = [{"article_id": a, "score": s, "title": snap.articles.title(a)} for a, s in articles]
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"index {snap.run_id}, backbone {backbone}: images")
    for rank, r in enumerate(answer["results"], 1):
        print(f"{rank:4d}  {r['image_id']}  {r['score']:.4f}  {' '.join(r['article_ids'][:5])}")
    if articles is not None:
        print("articles")
        for rank, r in enumerate(answer["articles"], 1):
            print(f"{rank:4d}  {r['article_id']}  {r['score']:.4f}  {r['title'] or ''}")
    return 0
