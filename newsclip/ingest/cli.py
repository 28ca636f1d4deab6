"""The `newsclip ingest CONFIG [--set k=v]` command: its parser, its run, and its summary for the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from newsclip.ingest.config import load
from newsclip.yaml_config import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `newsclip ingest CONFIG [--set k=v]` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "ingest", help="turn NewsImages CSV/TSV files and image folders (or URLs) into the input Parquet shards",
        description="Read each part's CSV/TSV file and images; write OUTPUT/articles/ and OUTPUT/images/ in the "
                    "input contract, ingest-summary.json and ingest-rejects.parquet. See jobs/ingest.yaml.")
    parser.add_argument("config", type=Path, help="ingest config (YAML), e.g. jobs/ingest.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set output_dir=data/ni --set network.enabled=true")
    return parser


def format_summary(summary: dict) -> str:
    """A few lines for the terminal: what was written and what was missing or unreadable, by part and reason."""
    lines = [(f"ingest: {summary['articles']} articles in {summary['article_shards']} shard(s), "
              f"{summary['images']} images in {summary['image_shards']} shard(s) under {summary['output_dir']} "
              f"({summary['seconds']}s)")]
    for name, f in summary["parts"].items():
        lines.append(f"  {name}: {f['rows']} rows -> {f['articles']} articles ({f['rejected_rows']} rejected rows, "
                     f"{f['articles_without_image_id']} without image id); images: {f['images']} written, "
                     f"{f['images_missing']} missing, {f['images_unreadable']} unreadable"
                     + (f"; {f['published_unparsed']} unparsable dates" if f["published_unparsed"] else ""))
    if summary["reasons"]:
        lines.append(f"  reasons (every row: {summary['output_dir']}/ingest-rejects.parquet):")
        lines += [f"    {count:6d}  {reason}" for reason, count in summary["reasons"].items()]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run `newsclip ingest`; ConfigError/IngestError/FileNotFoundError propagate (the CLI maps them to exit 2)."""
    from newsclip.ingest.job import ingest  # polars and pyarrow: loaded for this command only, not for `--help`

    cfg = load(args.config, args.overrides)
    print(format_summary(ingest(cfg)))
    return 0


def standalone(argv: list[str] | None = None) -> int:
    """`python -m newsclip.ingest CONFIG [--set k=v]`: the command without the rest of the CLI; exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m newsclip.ingest")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ingest", *(sys.argv[1:] if argv is None else argv)])
    try:
        return main(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"newsclip ingest: error: {e}", file=sys.stderr)
        return 2
