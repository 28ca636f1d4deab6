"""The `newsclip` command line: the demo, the job and each of its stages, demo data and the demo model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from newsclip.pipeline import STAGE_NAMES, WORKER_ENV, log

for _key, _value in WORKER_ENV.items():  # before torch is imported anywhere in this process
    os.environ.setdefault(_key, _value)

DEMO_ARTICLES = 2200  # a little over the 2,000 sampled pairs, after ~3% of articles are unusable


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", type=Path, help="job file (YAML), e.g. jobs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set input.articles=data/articles (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="newsclip", description=__doc__.split(":")[0] + ": match news "
                                     "articles to their images with CLIP, FAISS and Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="build demo data and demo-tiny if missing, run the demo job, print the metrics")
    p.add_argument("--output", type=Path, default=Path("newsclip-demo"),
                   help="folder for the demo's data and outputs (default: ./newsclip-demo)")
    p.add_argument("--articles", type=int, default=DEMO_ARTICLES, help=f"demo articles (default {DEMO_ARTICLES})")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("run", help="run every stage of a job: prepare, encode, knn, evaluate, report")
    _job_args(p)
    for stage, what in [("prepare", "join, clean and sample the input into prepared/"),
                        ("encode", "encode prepared texts and images per backbone into embeddings/"),
                        ("knn", "rank candidate images per text into rankings/"),
                        ("evaluate", "score rankings into metrics.csv and metrics.json"),
                        ("report", "write report.md from the metrics")]:
        _job_args(sub.add_parser(stage, help=f"{what} (one stage of `run`)"))

    p = sub.add_parser("demo-data", help="write synthetic news articles and images as Parquet shards")
    p.add_argument("dir", type=Path, help="output folder: DIR/articles/ and DIR/images/")
    p.add_argument("--articles", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo-model", help="train the demo-tiny CLIP into $NEWSCLIP_CACHE (default "
                       "~/.cache/newsclip), where jobs find it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if the model exists")
    p.add_argument("--evaluate", action="store_true", help="then score it on 2,000 held-out pairs")
    return parser


def _print_metrics(output: Path) -> None:
    import polars as pl

    frame = pl.read_csv(output / "metrics.csv")
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   float_precision=3):
        print(frame)


def _demo(args: argparse.Namespace) -> None:
    from newsclip import config
    from newsclip.demo.data import write_demo_data
    from newsclip.demo.model import ensure_demo_model
    from newsclip.pipeline import run_stages

    data = args.output / "data"
    if not (data / "articles").exists():
        log(f"demo data: writing {args.articles} articles to {data}")
        write_demo_data(data, args.articles, args.seed)
    ensure_demo_model(log=log)
    cfg = config.load(None, [f"input.articles={data / 'articles'}", f"input.images={data / 'images'}",
                             f"output_dir={args.output / 'output'}"])
    run_stages(cfg)
    _print_metrics(cfg.output)
    print(f"report: {cfg.output / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from newsclip.config import ConfigError

    try:
        if args.command == "demo":
            _demo(args)
        elif args.command == "demo-data":
            from newsclip.demo.data import write_demo_data

            counts = write_demo_data(args.dir, args.articles, args.seed)
            print(f"wrote {counts['articles']} articles to {args.dir / 'articles'} and {counts['images']} images "
                  f"to {args.dir / 'images'}")
        elif args.command == "demo-model":
            from newsclip.backbones import cache_dir
            from newsclip.demo.model import evaluate_demo_model, train_demo_model

            path = cache_dir() / "demo-tiny.pt"
            if args.force or not path.exists():
                train_demo_model(path, seed=args.seed, log=log)
            print(path)
            if args.evaluate:
                print(evaluate_demo_model(path))
        else:
            from newsclip import config
            from newsclip.pipeline import run_stages

            cfg = config.load(args.job, args.overrides)
            run_stages(cfg, STAGE_NAMES if args.command == "run" else (args.command,))
            if args.command in ("run", "evaluate"):
                _print_metrics(cfg.output)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"newsclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
