"""The `newsclip store compact|stats JOB.yaml` commands: their parser, their run, and what they print."""

from __future__ import annotations

import argparse
from pathlib import Path

KEEP_RUNS = 7  # a week of nightly runs: an article deleted and restored within it is not encoded again


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `newsclip store compact|stats JOB.yaml` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "store", help="the embedding store over many nights: what it holds (stats), drop what no recent run uses "
        "(compact)",
        description="The store (store_dir, default OUTPUT_DIR/store) keeps every embedding a job ever encoded, by "
                    "content hash, so nightly runs encode only new content; rows of deleted articles stay in it. "
                    "Each run records which rows it uses (runs/<run id>.json: store_refs).")
    actions = parser.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    compact = actions.add_parser(
        "compact", help="drop the embeddings that none of the job's last N runs uses",
        description="Drop every store row that none of the job's last N runs references (nor the outputs as they "
                    "are now), and the refs files only older runs name; print rows and bytes before and after. "
                    "Safe against crashes: kept rows are written to new parts beside the old ones, renamed in, and "
                    "only then are the old parts deleted; a rerun finishes an interrupted compaction. It takes the "
                    "job's lock (OUTPUT_DIR/.lock): while a run of the job is going it stops with exit 2, and no "
                    "run starts while it compacts. Content needed again later (an article restored after N runs) "
                    "is simply encoded again.")
    _job_args(compact)
    compact.add_argument("--keep-runs", type=int, default=KEEP_RUNS, metavar="N",
                         help=f"keep the rows of the last N runs of the job that committed something (default "
                         f"{KEEP_RUNS}: a week of nightly runs; 1 keeps only what the outputs use now); a rerun with "
                         "nothing to do, or a call that failed before committing, is not counted")
    compact.add_argument("--only-this-job", action="store_true",
                         help="compact a store_dir outside output_dir (one several jobs may share) by this job's "
                         "runs alone: rows only other jobs use are dropped (they encode them again); run it only "
                         "while no other job runs")
    _job_args(actions.add_parser(
        "stats", help="rows, bytes, backbones and precisions in the store, and the runs that reference them",
        description="Per store folder (backbone, checkpoint, precision, side): rows, parts, bytes and the job's runs "
                    "that reference its rows; then per run, how many rows it references. Reads only."))
    return parser


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", type=Path, help="job file (YAML), e.g. jobs/nightly.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set output_dir=newsclip-demo/nightly (repeatable)")


def size(n: int) -> str:
    """Bytes for people: 512 B, 20.5 kB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_compaction(result: dict) -> str:
    runs = result["runs"]
    which = f"run {runs[0]}" if len(runs) == 1 else f"{len(runs)} runs ({runs[0]} .. {runs[-1]})"
    lines = [f"store compact: {result['store']}, keeping the rows of the last {which} and of the outputs as they "
             "are now",
             f"  {'folder':52} {'rows before -> after':>22} {'bytes before -> after':>24}"]
    after = {f.name: f for f in result["after"]}
    for f in result["before"]:
        rows, size_after = (after[f.name].rows, after[f.name].bytes) if f.name in after else (0, 0)
        lines.append(f"  {f.name:52} {f.rows:>10} -> {rows:<9} {size(f.bytes):>11} -> {size(size_after)}")
    total = [sum(f.rows for f in result["before"]), sum(f.rows for f in result["after"]),
             sum(f.bytes for f in result["before"]), sum(f.bytes for f in result["after"])]
    lines.append(f"  {'total':52} {total[0]:>10} -> {total[1]:<9} {size(total[2]):>11} -> {size(total[3])}")
    if result["pruned_refs"]:
        lines.append(f"  {result['pruned_refs']} refs file(s) that only older runs named deleted")
    return "\n".join(lines)


def format_stats(result: dict) -> str:
    folders = result["folders"]
    shared = " (store_dir outside output_dir: other jobs' runs are not shown)" if result["shared"] else ""
    lines = [f"store {result['store']}{shared}: {len(folders)} folder(s), {sum(f.rows for f in folders)} rows, "
             f"{size(sum(f.bytes for f in folders))}",
             f"  {'backbone':20} {'checkpoint':16} {'precision':12} {'side':6} {'rows':>9} {'parts':>5} "
             f"{'size':>9}  runs referencing it"]
    for f in folders:
        users = result["users"].get(f.name, [])
        who = f"{len(users)}: {users[0]} .. {users[-1]}" if len(users) > 1 else users[0] if users else "none"
        lines.append(f"  {f.backbone:20} {f.checkpoint:16} {f.precision:12} {f.side:6} {f.rows:>9} {f.parts:>5} "
                     f"{size(f.bytes):>9}  {who}")
    lines.append(f"runs of this job, oldest first ({len(result['runs'])}): rows of the store each references")
    # a failed run's status is `failed: <error>: <message>`: its kind of error, whole, and not the message
    statuses = [": ".join(run["status"].split(": ")[:2]) for run in result["runs"]]
    width = max(map(len, statuses), default=0)
    for run, status in zip(result["runs"], statuses):
        rows = ("none recorded (it died, or ran before runs recorded them)" if run["rows"] is None
                else f"{run['rows']} rows" + (f" ({run['pruned']} refs file(s) compacted away)" if run["pruned"]
                                              else ""))
        lines.append(f"  {run['run_id']:28} {status:{width}} {rows}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run `newsclip store ACTION`; ConfigError/StoreError (ValueError)/RunLockedError propagate (exit 2)."""
    from newsclip import config
    from newsclip.runtime import store_maintenance

    cfg = config.load(args.job, args.overrides)
    if args.store_command == "compact":
        print(format_compaction(store_maintenance.compact(cfg, args.keep_runs, args.only_this_job)))
    else:
        print(format_stats(store_maintenance.stats(cfg)))
    return 0
