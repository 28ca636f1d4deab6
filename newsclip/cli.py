"""The `newsclip` command line: the demo, the job and each of its stages, demo data and the demo model."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from newsclip.runtime import console
from newsclip.runtime.console import log, print_metrics
from newsclip.runtime.ray_setup import WORKER_ENV
from newsclip.runtime.runner import STAGE_NAMES

for _key, _value in WORKER_ENV.items():  # before torch is imported anywhere in this process (and its workers)
    os.environ.setdefault(_key, _value)
warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)

DEMO_ARTICLES = 2200  # a little over the 2,000 sampled pairs, after ~3% of articles are unusable


def _verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every message and Ray's own logs (workers' output, Ray Data's progress) as plain "
                        "lines, besides OUTPUT_DIR/logs/ where they always go")


def _job_args(parser: argparse.ArgumentParser, verbose: bool = True) -> None:
    parser.add_argument("job", type=Path, help="job file (YAML), e.g. jobs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set input.articles=data/articles (repeatable)")
    if verbose:
        _verbose_arg(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="newsclip", description=__doc__.split(":")[0] + ": match news "
                                     "articles to their images with CLIP, FAISS and Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="build demo data and demo-tiny if missing, run the demo job, print the metrics")
    p.add_argument("--output", type=Path, default=Path("newsclip-demo"),
                   help="folder for the demo's data and outputs (default: ./newsclip-demo)")
    p.add_argument("--articles", type=int, default=DEMO_ARTICLES, help=f"demo articles (default {DEMO_ARTICLES})")
    p.add_argument("--seed", type=int, default=0)
    _verbose_arg(p)

    p = sub.add_parser("run", help="run every stage of a job: prepare, translate, encode, knn, evaluate, report; "
                       "stages whose inputs are unchanged since they last committed are skipped, so rerunning "
                       "after a crash finishes the job and a nightly run does only the new work")
    _job_args(p)
    p.add_argument("--force", action="store_true",
                   help="rerun every stage (embeddings already in the store are still reused, not re-encoded)")
    p = sub.add_parser("rejects", help="summarise the rows a job rejected: per stage, kind and reason, with examples")
    _job_args(p, verbose=False)
    p.add_argument("--examples", type=int, default=3, metavar="N", help="example ids per reason (default 3)")
    p.add_argument("--csv", action="store_true", help="print every rejected row (id, kind, stage, reason) as CSV")
    for stage, what in [("prepare", "join, clean and sample the input into prepared/"),
                        ("encode", "encode prepared texts and images per backbone into embeddings/"),
                        ("knn", "rank candidate images per text into rankings/"),
                        ("evaluate", "score rankings into metrics.csv and metrics.json"),
                        ("report", "write report.md and report.html from the metrics")]:
        _job_args(sub.add_parser(stage, help=f"{what} (one stage of `run`)"))

    p = sub.add_parser("finetune", help="fine-tune a backbone on the archive's pairs (the eval sample held out) with "
                       "Ray Train into OUTPUT_DIR/finetune/<run>/model.pt; settings: `finetune:`. The same command "
                       "again resumes the run from its last checkpoint")
    _job_args(p)
    p.add_argument("--restart", action="store_true", help="start the run over: remove OUTPUT_DIR/finetune/<run>/ "
                   "(its checkpoints too) first")

    from newsclip.finetune.demo import ARTICLES as SHIFTED_ARTICLES

    p = sub.add_parser("demo-finetune", help="fine-tune demo-tiny on a shifted demo archive (colours and places it "
                       "never saw), then compare with zero-shot demo-tiny on held-out pairs (jobs/finetune-demo.yaml)")
    p.add_argument("--output", type=Path, default=Path("newsclip-demo/shifted"),
                   help="folder for the archive (DIR/data) and the outputs (DIR/output); default newsclip-demo/shifted")
    p.add_argument("--articles", type=int, default=SHIFTED_ARTICLES,
                   help=f"articles in the shifted archive (default {SHIFTED_ARTICLES})")
    p.add_argument("--seed", type=int, default=0)
    _verbose_arg(p)

    p = sub.add_parser("backbones", help="list the backbones newsclip knows and whether their weights are on disk; "
                       "with a job, its own backbones (open_clip's included) and each file they need")
    p.add_argument("job", type=Path, nargs="?", default=None,
                   help="a job file: list its backbones as it resolves them; exit status 2 when a file is missing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the job, e.g. --set encode.hf_cache=/models/hf-hub (repeatable)")
    p.add_argument("--download-root", type=Path, default=None,
                   help="where OpenAI weights are cached (default: clip's ~/.cache/clip; with a job, its "
                        "encode.download_root, which this replaces)")

    p = sub.add_parser("demo-data", help="write synthetic news articles and images as Parquet shards")
    p.add_argument("dir", type=Path, help="output folder: DIR/articles/ and DIR/images/ (empty, unless --append)")
    p.add_argument("--articles", type=int, default=2000, help="articles to write (default 2000); about 3%% of "
                   "them lack a text or an image, like the real data")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same bytes (default 0)")
    p.add_argument("--append", action="store_true", help="add new articles (ids after the existing ones) and their "
                   "images as new shards: the next day of an archive, for a nightly run")
    p.add_argument("--shifted", action="store_true", help="scenes in colours and places demo-tiny never saw, in "
                   "English (the fine-tuning demo's archive)")

    p = sub.add_parser("demo-model", help="train the demo-tiny CLIP into $NEWSCLIP_CACHE (default "
                       "~/.cache/newsclip), where jobs find it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if the model exists")
    p.add_argument("--evaluate", action="store_true", help="then score it on 2,000 held-out pairs")

    p = sub.add_parser("demo-translator", help="build the demo German->English Argos package into $NEWSCLIP_CACHE "
                       "and install it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", action="store_true", help="then score it on 500 held-out sentences")

    from newsclip.ingest.cli import add_parser as add_ingest_parser

    add_ingest_parser(sub)
    from newsclip.runtime.store_cli import add_parser as add_store_parser
    add_store_parser(sub)
    from newsclip.serve.cli import add_parsers as add_serve_parsers

    add_serve_parsers(sub)

    p = sub.add_parser("translate", help="offline translation: install or list Argos packages, run the translate stage")
    tsub = p.add_subparsers(dest="translate_command", required=True, metavar="ACTION")
    q = tsub.add_parser("install", help="install .argosmodel files (or folders of them); nothing is downloaded")
    q.add_argument("paths", type=Path, nargs="+")
    q.add_argument("--packages-dir", type=Path, default=None,
                   help="target (default: translate.packages_dir's default, $NEWSCLIP_CACHE/argos-packages)")
    q = tsub.add_parser("list", help="list installed packages")
    q.add_argument("--packages-dir", type=Path, default=None)
    _job_args(tsub.add_parser("run", help="the job's translate stage: non-English query texts to English into "
                              "translated/ (one stage of `run`)"))
    return parser


def _demo(args: argparse.Namespace) -> None:
    from newsclip import config
    from newsclip.demo.data import write_demo_data
    from newsclip.demo.model import ensure_demo_model
    from newsclip.runtime.runner import run_stages
    from newsclip.runtime.store import output_folder

    data = output_folder(args.output, "demo --output") / "data"
    held = _demo_articles(data)
    if held is None:
        with console.stage("demo data") as line:
            write_demo_data(data, args.articles, args.seed)
            line.finish(f"{args.articles} articles written to {data} in {line.seconds:.1f}s")
    else:
        log(f"demo data: reusing the {held} articles in {data} from an earlier demo"
            + (f" (not {args.articles}: delete {data} for new data)" if held != args.articles else ""))
    with console.stage("demo model", lazy=True):  # a line only when it is trained (once, cached)
        ensure_demo_model(log=log)
    cfg = config.load(None, [f"input.articles={data / 'articles'}", f"input.images={data / 'images'}",
                             f"output_dir={args.output / 'output'}"])
    with console.stage("demo translator", lazy=True):  # the same: a line only when it is built
        _ensure_demo_translator(Path(cfg.translate.resolved().packages_dir))
    run_stages(cfg)
    print_metrics(cfg.output)
    print(f"report: {cfg.layout.report_md}")


def _demo_articles(data: Path) -> int | None:
    """How many articles the demo data in `data` holds; None when there is none. A file there is no folder."""
    if data.exists() and not data.is_dir():
        raise ValueError(f"{data}: is a file, not a folder of demo data; choose another folder")
    shards = sorted((data / "articles").glob("*.parquet"))
    if not shards:
        return None
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in shards)


def _demo_data(args: argparse.Namespace) -> None:
    from newsclip.demo.data import append_demo_data, write_demo_data
    from newsclip.runtime.store import output_folder

    output_folder(args.dir, "demo-data DIR")
    held = _demo_articles(args.dir)
    if held is not None and not args.append:  # new shards beside the old ones would mix two archives
        raise ValueError(f"{args.dir}: already holds demo data ({held} articles in {args.dir / 'articles'}); pass "
                         "--append to add a day to it, or choose an empty folder (or delete this one)")
    write = append_demo_data if args.append else write_demo_data
    counts = write(args.dir, args.articles, args.seed, shifted=args.shifted)
    print(f"wrote {counts['articles']} articles to {args.dir / 'articles'} and {counts['images']} images "
          f"to {args.dir / 'images'}")


def _backbones(args: argparse.Namespace) -> int:
    from newsclip.retrieval.backbones import BACKBONES, resolve_weights

    if args.job is not None:
        return _job_backbones(args)
    print(f"{'backbone':16} {'family':7} {'input':>5} {'embed':>5}  weights")
    for name, spec in BACKBONES.items():
        try:
            weights = str(resolve_weights(name, args.download_root))
        except FileNotFoundError:
            weights = "missing (`newsclip demo-model`)" if name == "demo-tiny" else "missing"
        print(f"{name:16} {spec.family:7} {spec.input_resolution:5} {spec.embed_dim:5}  {weights}")
    return 0


def _job_backbones(args: argparse.Namespace) -> int:
    """A job's backbones as a run resolves them (its mapping entries, download_root, hf_cache), each with its weights
    file, or every file it lacks with where it was looked for and how to fetch it: a check before a run."""
    from newsclip.finetune.run import searched_job
    from newsclip.names import is_fusion

    root = [f"encode.download_root={args.download_root}"] if args.download_root else []
    cfg = searched_job(args.job, [*args.overrides, *root])
    missing = 0
    for name in (n for n in cfg.backbones if not is_fusion(n)):  # a fusion has no weights of its own
        try:
            b = cfg.resolved(name)
        except FileNotFoundError as e:
            missing += 1
            print(f"{name}: missing\n  " + str(e).replace("\n", "\n  "))
            continue
        model = "clip" if b.kind == "clip" else f"open_clip {b.arch}"
        print(f"{name}: {model}, {b.image_size[0]} px, {b.embed_dim}-d, texts {b.text}; weights {b.weights}")
    return 2 if missing else 0


def _run_job(args: argparse.Namespace, stages: tuple[str, ...]) -> None:
    from newsclip import config
    from newsclip.runtime.runner import run_stages

    cfg = config.load(args.job, args.overrides)
    # a stage named on its own always runs; `run` skips what is up to date unless --force
    run_stages(cfg, stages, force=getattr(args, "force", False) or len(stages) == 1)
    if "evaluate" in stages:
        print_metrics(cfg.output)


def _rejects(args: argparse.Namespace) -> None:
    import polars as pl

    from newsclip import config
    from newsclip.runtime.rejects import read_rejects, rejects_summary

    if args.examples < 0:
        raise ValueError(f"--examples: must be 0 or more, got {args.examples}")
    cfg = config.load(args.job, args.overrides)
    out = cfg.output
    if not cfg.layout.rejects.is_dir():
        raise ValueError(f"{cfg.layout.rejects} does not exist: no stage of this job has run in {out}; run "
                         f"`newsclip run {args.job}` (or `newsclip prepare {args.job}`) first, or check output_dir")
    if args.csv:
        sys.stdout.write(read_rejects(out).write_csv())
        return
    summary = rejects_summary(out, args.examples)
    print(f"{summary['rows'].sum()} rejected rows in {cfg.layout.rejects}")
    with pl.Config(tbl_rows=1000, tbl_width_chars=200, fmt_str_lengths=80, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        print(summary)


def _ensure_demo_translator(packages_dir: Path, seed: int = 0) -> Path:
    """Build (once, cached) and install the demo de->en package unless a de->en package is installed."""
    from newsclip.retrieval.backbones import cache_dir
    from newsclip.translate import build_demo_translator, install_packages, installed_pairs

    if ("de", "en") not in installed_pairs(packages_dir):
        log(f"demo translator: building and installing into {packages_dir}")
        install_packages([build_demo_translator(cache_dir() / f"demo-translator-{seed}", seed=seed, log=log)],
                         packages_dir)
    return packages_dir


def _translate(args: argparse.Namespace) -> None:
    if args.translate_command == "run":
        return _run_job(args, ("translate",))
    from newsclip.translate import install_packages
    from newsclip.translate.packages import installed_packages
    from newsclip.translate.translator import TranslateConfig

    packages_dir = args.packages_dir or Path(TranslateConfig().resolved().packages_dir)
    if args.translate_command == "install":
        for name in install_packages(args.paths, packages_dir):
            print(f"installed {name} into {packages_dir}")
    else:
        packages = installed_packages(packages_dir)
        if not packages:
            print(f"no Argos packages installed in {packages_dir}; install one with `newsclip translate install "
                  f"FILE.argosmodel --packages-dir {packages_dir}` (`newsclip demo-translator` builds and installs "
                  "the demo's de->en package)")
        for meta in packages:
            print(f"{meta.get('from_code')}->{meta.get('to_code')}  version {meta.get('package_version')}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives search's optional QUERY nothing when options come between it and the job (`search JOB --set
    # K=V "text"`) and leaves the text over: it is the query
    if getattr(args, "command", None) == "search" and args.query is None and len(extra) == 1 \
            and not extra[0].startswith("-"):
        args.query, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.configure(verbose=getattr(args, "verbose", False))
    from newsclip.runtime.preflight import PreflightError
    from newsclip.runtime.ray_setup import ResourcesUnavailableError
    from newsclip.runtime.runner import RunInterrupted, RunLockedError, StageOrderError
    from newsclip.serve.index import IndexNotReady
    from newsclip.translate.packages import MissingLanguagePackageError
    from newsclip.yaml_config import ConfigError

    try:
        if args.command == "demo":
            _demo(args)
        elif args.command == "demo-data":
            _demo_data(args)
        elif args.command == "backbones":
            return _backbones(args)
        elif args.command == "ingest":
            from newsclip.ingest.cli import main as ingest_main

            return ingest_main(args)
        elif args.command == "store":
            from newsclip.runtime.store_cli import main as store_main
            return store_main(args)
        elif args.command in ("search", "serve"):
            from newsclip.serve.cli import main as serve_main

            return serve_main(args)
        elif args.command == "translate":
            _translate(args)
        elif args.command == "rejects":
            _rejects(args)
        elif args.command == "demo-translator":
            from newsclip.translate.translator import TranslateConfig

            packages_dir = _ensure_demo_translator(Path(TranslateConfig().resolved().packages_dir), args.seed)
            print(f"de->en installed in {packages_dir}")
            if args.evaluate:
                from newsclip.retrieval.backbones import cache_dir
                from newsclip.translate.demo_translator import PACKAGE_FILENAME, evaluate_package

                print(evaluate_package(cache_dir() / f"demo-translator-{args.seed}" / PACKAGE_FILENAME))
        elif args.command == "finetune":
            from newsclip.finetune.run import main as finetune_main

            return finetune_main(args)
        elif args.command == "demo-finetune":
            from newsclip.finetune.demo import run_demo

            return run_demo(args.output, args.articles, args.seed)
        elif args.command == "demo-model":
            from newsclip.demo.model import evaluate_demo_model, train_demo_model
            from newsclip.retrieval.backbones import cache_dir

            path = cache_dir() / "demo-tiny.pt"
            if args.force or not path.exists():
                train_demo_model(path, seed=args.seed, log=log)
            print(path)
            if args.evaluate:
                print(evaluate_demo_model(path))
        else:
            _run_job(args, STAGE_NAMES if args.command == "run" else (args.command,))
    except StageOrderError as e:
        print(f"newsclip {args.command}: error: {e}; run {_commands(e.missing, args)} first, or `newsclip run "
              f"{getattr(args, 'job', 'JOB.yaml')}` for every stage (it skips what is up to date)", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError, ValueError, MissingLanguagePackageError, RunLockedError, PreflightError,
            ResourcesUnavailableError, IndexNotReady) as e:
        print(f"newsclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        where = f" during {e.stage}" if isinstance(e, RunInterrupted) and e.stage else ""
        resume = "; the stages committed before it are kept: run the same command again to resume" \
            if isinstance(e, RunInterrupted) else ""
        print(f"\nnewsclip {args.command}: interrupted{where}{resume}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE: the reader (`| head`) stopped reading, as for any Unix command
    return 0


def _commands(stages: list[str], args: argparse.Namespace) -> str:
    """The commands that run `stages` of this job, one by one."""
    job = getattr(args, "job", "JOB.yaml")
    return " then ".join(f"`newsclip {'translate run' if name == 'translate' else name} {job}`"
                         for name in stages)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit finds no closed pipe to fail on again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def entry() -> None:
    """The `newsclip` command: `main`, then `exit_now` (a failure raises and exits as usual)."""
    exit_now(main())


def exit_now(code: int | None) -> NoReturn:
    """Run the atexit handlers (logging's, Ray's shutdown), flush stdout and stderr, and end the process without
    Python's teardown of every module: with torch imported that took 1-1.5 s, a tenth of a small night."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
