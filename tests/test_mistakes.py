"""A new user's mistakes get a clear answer: exit status 2 and one line naming the file or key and what to do, never a
traceback; and nothing stale is shipped: a stage's commit removes what it no longer makes, and publishing copies only
what the manifest says is current."""

import importlib.util
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from newsclip import config
from newsclip.cli import main
from newsclip.runtime import console, runner
from newsclip.runtime.rejects import write_rejects
from newsclip.runtime.stage import Stage
from newsclip.runtime.store import read_manifest, record_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def plain_console():
    console.configure()
    yield
    console.configure()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small demo archive (40 articles), written once for the module."""
    from newsclip.demo.data import write_demo_data

    root = tmp_path_factory.mktemp("data")
    write_demo_data(root, 40, seed=3)
    return root


def _job(tmp_path: Path, data: Path, text: str = "", translate: bool = False) -> str:
    job = tmp_path / "job.yaml"
    job.write_text(f"input:\n  articles: {data / 'articles'}\n  images: {data / 'images'}\n"
                   f"output_dir: {tmp_path / 'out'}\ntranslate:\n  enabled: {str(translate).lower()}\n{text}")
    return str(job)


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def _refuse_the_lock(monkeypatch):
    """A read-only output folder (the tests run as root, which writes anywhere: the lock's open is refused)."""
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runner, "open", refuse, raising=False)


def _prepared_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"completed": {"prepare": {"key": "k", "digest": "d",
                                                                             "files": []}}}))


def _ingest_config(tmp_path: Path) -> str:
    (tmp_path / "part.csv").write_text("article_id,title,text,image_id\n1,A title,A body,\n")
    config_file = tmp_path / "ingest.yaml"
    config_file.write_text(f"parts:\n  - {{name: RSS, file: {tmp_path / 'part.csv'}}}\n")
    return str(config_file)


def _truncate_a_shard(tmp_path: Path, data: Path) -> Path:
    copy = tmp_path / "copy"
    for side in ("articles", "images"):
        (copy / side).mkdir(parents=True)
        for shard in (data / side).glob("*.parquet"):
            (copy / side / shard.name).write_bytes(shard.read_bytes())
    shard = copy / "articles" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])  # a copy cut short: its footer is gone
    return copy


# (what, the command (from tmp_path and the data), a setup (tmp_path, data, monkeypatch) or None, what the line says)
MISTAKES = [
    ("output_dir is a file", lambda t, d: ["prepare", _job(t, d), "--set", f"output_dir={_file(t)}"], None,
     ["output_dir:", "a-file is a file, not a folder", "choose a folder"]),
    ("output_dir is a file, for a later stage", lambda t, d: ["report", _job(t, d), "--set", f"output_dir={_file(t)}"],
     None, ["output_dir:", "a-file is a file, not a folder"]),
    ("a read-only output folder", lambda t, d: ["prepare", _job(t, d)], lambda t, d, m: _refuse_the_lock(m),
     ["output_dir: cannot write in", "Permission denied", "make it writable"]),
    ("a section that is no mapping", lambda t, d: ["run", _job(t, d), "--set", "eval=3"], None,
     ["eval: expected a mapping of keys, got 3"]),
    ("a folder for the job file", lambda t, d: ["run", str(REPO / "jobs")], None,
     ["jobs: is a folder; expected a job file", "demo.yaml"]),
    ("demo-data into a file", lambda t, d: ["demo-data", str(_file(t))], None,
     ["demo-data DIR:", "is a file, not a folder"]),
    ("demo-data into a folder that holds demo data", lambda t, d: ["demo-data", str(t / "d"), "--articles", "5"],
     lambda t, d, m: main(["demo-data", str(t / "d"), "--articles", "3"]),
     ["already holds demo data (3 articles", "--append", "empty folder"]),
    ("ingest into a file", lambda t, d: ["ingest", _ingest_config(t), "--set", f"output_dir={_file(t)}"], None,
     ["output_dir:", "is a file, not a folder"]),
    ("rejects with a negative --examples", lambda t, d: ["rejects", _job(t, d), "--examples", "-1"], None,
     ["--examples: must be 0 or more, got -1"]),
    ("eval.bootstrap 0", lambda t, d: ["run", _job(t, d), "--set", "eval.bootstrap=0"], None,
     ["eval.bootstrap: must be at least 1"]),
    ("a truncated input shard", lambda t, d: ["prepare", _job(t, _truncate_a_shard(t, d))], None,
     ["copy/articles/part-00000.parquet: not a readable Parquet file", "write it again"]),
    ("encode before translate", lambda t, d: ["encode", _job(t, d, translate=True)], lambda t, d, m: _prepared_only(t),
     ["encode reads what translate commits", "job.yaml` first", "run `newsclip translate run "]),
    ("report before any run", lambda t, d: ["report", _job(t, d)], None,
     ["report reads what prepare, encode, knn, evaluate commit", "`newsclip prepare",  # translate: disabled
      "then `newsclip encode", "then `newsclip evaluate"]),
    ("rejects before any run", lambda t, d: ["rejects", _job(t, d)], None,
     ["rejects does not exist: no stage of this job has run", "newsclip run"]),
    ("an empty job file", lambda t, d: ["run", str(_write(t, "empty.yaml", ""))], None,
     ["empty.yaml: input.articles and input.images: not given", "--set input.articles="]),
    ("a job file without input", lambda t, d: ["run", str(_write(t, "job.yaml", "name: x\n"))], None,
     ["input.articles and input.images: not given"]),
    ("a key given twice", lambda t, d: ["run", str(_write(t, "job.yaml", "name: a\neval:\n  k: 5\n  k: 10\n"))],
     None, ["job.yaml: line 4: the key 'k' is given twice (first on line 3); keep one"]),
]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.mark.parametrize("what, command, setup, says", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_exits_2_with_one_line_that_says_what_to_do(tmp_path, data, monkeypatch, capsys, what, command,
                                                                   setup, says):
    if setup:
        setup(tmp_path, data, monkeypatch)
    argv = command(tmp_path, data)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"newsclip {argv[0]}: error: ")
    for words in says:
        assert words in line, line
    assert not (tmp_path / "out" / ".staging").exists()


def test_a_job_without_translation_needs_no_translate_commit_before_encode(tmp_path, data):
    """With `translate.enabled: false` encode reads the prepared queries: prepare's commit is all it needs."""
    from newsclip import config
    from newsclip.runtime.runner import StageOrderError, _check_order

    _prepared_only(tmp_path)
    cfg = config.load(_job(tmp_path, data))
    _check_order(cfg, cfg.output, ("encode",))  # no error
    with pytest.raises(StageOrderError, match="encode reads what translate commits"):
        _check_order(config.load(_job(tmp_path, data, translate=True)), cfg.output, ("encode",))


def test_a_stage_commit_removes_what_it_no_longer_makes_and_publish_ships_only_the_current(tmp_path, monkeypatch):
    """A second configuration (one direction fewer) leaves no file of the first in rankings/, also when a run
    in between died inside the stage; publishing copies the manifest's current files, never the lock or logs."""
    crash = []

    def knn(cfg):
        if crash:
            raise RuntimeError("killed")
        entries = []
        for direction in cfg.eval.directions:
            path = cfg.output / "rankings" / f"demo-tiny.{direction}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(direction)
            entries.append(record_stage(cfg.output, f"knn:{direction}", [path]))
        return entries

    monkeypatch.setattr(runner, "_stage", lambda name: Stage(name, knn if name == "knn" else lambda cfg: None))
    both = config.load(None, [f"output_dir={tmp_path / 'out'}"])
    runner.run_stages(both)
    rankings = tmp_path / "out" / "rankings"
    assert sorted(p.name for p in rankings.iterdir()) == ["demo-tiny.image_to_text.tsv", "demo-tiny.text_to_image.tsv"]
    one = config.load(None, [f"output_dir={tmp_path / 'out'}", "eval.directions=[text_to_image]"])
    crash.append(True)
    with pytest.raises(RuntimeError, match="killed"):
        runner.run_stages(one)
    crash.clear()
    runner.run_stages(one)
    assert sorted(p.name for p in rankings.iterdir()) == ["demo-tiny.text_to_image.tsv"]
    assert "knn:image_to_text" not in read_manifest(tmp_path / "out")["stages"]  # nor its facts

    spec = importlib.util.spec_from_file_location("newsclip_jobs_submit", REPO / "jobs" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    (tmp_path / "out" / "logs").mkdir(exist_ok=True)
    (tmp_path / "out" / "logs" / "newsclip.log").write_text("a log")
    copied = submit.publish(tmp_path / "out", str(tmp_path / "published"))
    assert copied == ["rankings/demo-tiny.text_to_image.tsv", "config.resolved.yaml", "manifest.json"]
    assert not (tmp_path / "published" / ".lock").exists()


def test_ids_with_a_tab_or_a_line_break_are_rejected_at_prepare(tmp_path):
    from newsclip.stages import prepare

    rows = [{"article_id": f"a{i}", "title": f"T{i}", "text": "body", "image_id": f"i{i}", "source": "TW"}
            for i in range(4)]
    rows += [{"article_id": "tab\there", "title": "T", "text": "b", "image_id": "i0", "source": "TW"},
             {"article_id": "new\nline", "title": "T", "text": "b", "image_id": "i1", "source": "TW"},
             {"article_id": "carriage\rreturn", "title": "T", "text": "b", "image_id": "i2", "source": "TW"},
             {"article_id": "a9", "title": "T", "text": "b", "image_id": "bad\timage", "source": "TW"}]
    (tmp_path / "a").mkdir()
    (tmp_path / "i").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a" / "part-0.parquet")
    from newsclip.demo.data import write_demo_data

    write_demo_data(tmp_path / "demo", 3, seed=1)  # three real images, under our ids
    images = pq.read_table(tmp_path / "demo" / "images").column("image").to_pylist()[:3]
    pq.write_table(pa.table({"image_id": ["i0", "i1", "bad\timage"], "image": images}),
                   tmp_path / "i" / "part-0.parquet")
    cfg = config.load(None, [f"input.articles={tmp_path / 'a'}", f"input.images={tmp_path / 'i'}",
                             f"output_dir={tmp_path / 'out'}"])
    prepare.run(cfg)
    rejects = pl.read_parquet(tmp_path / "out" / "rejects" / "prepare.parquet")
    reasons = dict(zip(rejects["id"], rejects["reason"]))
    tsv = "which the rankings TSV cannot hold"
    for bad in ("tab\there", "new\nline", "carriage\rreturn", "bad\timage", "a9"):
        assert tsv in reasons[bad], (bad, reasons.get(bad))
    kept = pl.read_parquet(tmp_path / "out" / "prepared" / "articles.parquet")["article_id"].to_list()
    assert not any(ch in i for i in kept for ch in "\t\n\r")


def test_a_prepare_that_keeps_nothing_writes_its_rejects_and_counts_what_it_read(tmp_path, data, capsys):
    out = tmp_path / "out"
    (out / "rejects").mkdir(parents=True)
    write_rejects(out, "prepare", "prepare", pa.table({"id": ["old"], "kind": ["article"], "reason": ["stale"]}))
    assert main(["prepare", _job(tmp_path, data), "--set", "encode.max_image_pixels=100"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    images = sum(pq.read_metadata(p).num_rows for p in (data / "images").glob("*.parquet"))
    assert f"(of 40 articles, {images} images)" in line and "newsclip rejects" in line
    rejects = pl.read_parquet(out / "rejects" / "prepare.parquet")
    assert "old" not in rejects["id"].to_list()  # this run's rejects, not an earlier run's
    assert (rejects["kind"] == "image").sum() == images and rejects["reason"].str.contains("pixels").any()


def test_ctrl_c_says_what_was_interrupted_and_that_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    def translate(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_stage", lambda name: Stage(name, translate if name == "translate" else
                                                             lambda cfg: record_stage(cfg.output, name, [])))
    job = _write(tmp_path, "job.yaml", f"input: {{articles: a, images: i}}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["run", str(job)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("newsclip run: interrupted during translate; the stages committed before "
                                            "it are kept: run the same command again to resume")
    record = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    assert record["status"] == "interrupted" and record["stages"]["prepare"]["status"] == "done"


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, data, monkeypatch, capsys):
    out = tmp_path / "out"
    write_rejects(out, "prepare", "prepare", pa.table({"id": ["a"], "kind": ["article"], "reason": ["no text"]}))

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            raise OSError("no file")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["rejects", _job(tmp_path, data), "--csv"]) == 141  # as for any command a SIGPIPE ends
    assert capsys.readouterr().err == ""


def test_a_failed_stage_leaves_its_error_and_traceback_in_the_log(tmp_path, monkeypatch):
    def encode(cfg):
        raise ValueError("the weights are gone")

    monkeypatch.setattr(runner, "_stage", lambda name: Stage(name, encode if name == "encode" else
                                                             lambda cfg: record_stage(cfg.output, name, [])))
    with pytest.raises(ValueError):
        runner.run_stages(config.load(None, [f"output_dir={tmp_path / 'out'}"]))
    log = (tmp_path / "out" / "logs" / "newsclip.log").read_text()
    assert "encode: failed after" in log and "ValueError: the weights are gone" in log
    assert "Traceback (most recent call last)" in log and "in encode" in log


def test_an_unknown_backbone_stops_the_run_before_its_first_stage(tmp_path, data, capsys):
    assert main(["run", _job(tmp_path, data), "--set", "backbones=[nope]"]) == 2
    assert "unknown backbone 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_is_no_checkpoint_gets_no_advice_to_unpickle_it(tmp_path):
    from newsclip.retrieval.backbones import input_sizes

    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a checkpoint at all\n" * 10)
    with pytest.raises(ValueError) as info:
        input_sizes(str(garbage))
    message = str(info.value)
    assert str(garbage) in message and "name another file in backbones" in message
    assert "weights_only" not in message and "\n" not in message


def test_store_stats_shows_a_failed_runs_error_whole():
    from newsclip.runtime.store_cli import format_stats

    runs = [{"run_id": "20260101T020000Z-000000", "status": "finished", "rows": 6, "pruned": 0},
            {"run_id": "20260102T020000Z-000001", "status": "failed: FileNotFoundError: [Errno 2] no such file",
             "rows": None, "pruned": 0}]
    printed = format_stats({"store": "s", "shared": False, "folders": [], "users": {}, "runs": runs})
    failed = next(line for line in printed.splitlines() if "000001" in line)
    assert "failed: FileNotFoundError none recorded" in " ".join(failed.split())
    assert "[Errno 2]" not in failed


def test_translate_list_says_when_nothing_is_installed_and_how_to_install(tmp_path, capsys):
    assert main(["translate", "list", "--packages-dir", str(tmp_path / "argos")]) == 0
    printed = capsys.readouterr().out
    assert f"no Argos packages installed in {tmp_path / 'argos'}" in printed
    assert f"newsclip translate install FILE.argosmodel --packages-dir {tmp_path / 'argos'}" in printed


def test_the_missing_package_hint_installs_where_the_job_looks():
    from newsclip.translate.packages import MissingLanguagePackageError

    message = str(MissingLanguagePackageError("de", 3, "/srv/argos"))
    assert "newsclip translate install translate-de_en.argosmodel --packages-dir /srv/argos" in message


def test_demo_data_options_say_what_they_do_and_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo-data", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--articles ARTICLES articles to write (default 2000)" in text
    assert "--seed SEED random seed" in text and "(default 0)" in text


def test_the_demo_says_when_it_reuses_data_and_how_much(tmp_path, monkeypatch, capsys):
    from newsclip import cli
    from newsclip.demo import model
    from newsclip.demo.data import write_demo_data

    write_demo_data(tmp_path / "demo" / "data", 12, seed=2)
    monkeypatch.setattr(model, "ensure_demo_model", lambda log: None)
    monkeypatch.setattr(cli, "_ensure_demo_translator", lambda packages_dir: packages_dir)
    monkeypatch.setattr(runner, "run_stages", lambda cfg: None)
    monkeypatch.setattr(cli, "print_metrics", lambda output: None)
    assert main(["demo", "--output", str(tmp_path / "demo"), "--articles", "600"]) == 0
    err = capsys.readouterr().err
    assert f"reusing the 12 articles in {tmp_path / 'demo' / 'data'}" in err and "not 600" in err
    assert len(list((tmp_path / "demo" / "data" / "articles").glob("*.parquet"))) == 1  # nothing written
