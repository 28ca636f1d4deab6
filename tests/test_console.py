"""The console: one line per stage (redrawn in place on a terminal, printed once elsewhere), every message in
logs/newsclip.log, Ray's own logs in logs/ and on the console only with --verbose."""

import io
import logging
import re
import subprocess
import sys

import pytest

from newsclip import config
from newsclip.runtime import console, runner
from newsclip.runtime.console import CLEAR
from newsclip.runtime.ray_setup import RAY_LOG, ray_logs
from newsclip.runtime.stage import Stage
from newsclip.runtime.store import record_stage

LINE = re.compile(r"^\[newsclip \d\d:\d\d:\d\d\] (\w+): (.*)$")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def plain_console():
    """Each test starts from the CLI's default console (and leaves it so for the others)."""
    console.configure()
    yield
    console.configure()


def _fake_stage(name: str) -> Stage:
    """A stage that reports as the real ones do: messages, progress, a manifest entry with counts."""

    def run(cfg):
        console.log(f"{name}: working on it")
        for done in (0, 5, 10):
            console.progress(done, 10, part="side")
        return record_stage(cfg.output, name, [], rows=10, new=10)

    return Stage(name, run)


@pytest.fixture
def fake_stages(monkeypatch):
    monkeypatch.setattr(runner, "_stage", _fake_stage)


def test_plain_run_prints_one_line_per_stage(tmp_path, fake_stages, capsys):
    cfg = config.load(None, [f"output_dir={tmp_path / 'out'}"])
    runner.run_stages(cfg)
    err = capsys.readouterr().err
    lines = [LINE.match(line) for line in err.splitlines()]
    assert all(lines), err
    assert [m[1] for m in lines] == list(runner.STAGE_NAMES)
    assert all(re.fullmatch(r"done in [\d.]+s, 10 rows, 10 new", m[2]) for m in lines), err
    assert "\r" not in err and "working on it" not in err  # not a terminal: no redrawing; news is in the log
    log = (tmp_path / "out" / "logs" / "newsclip.log").read_text()
    assert "prepare: working on it" in log and "report: done in" in log

    runner.run_stages(cfg)  # nothing to do: a line per stage, and the log file untouched
    lines = capsys.readouterr().err.splitlines()
    assert [LINE.match(line)[2] for line in lines] == ["up to date"] * len(runner.STAGE_NAMES)
    assert (tmp_path / "out" / "logs" / "newsclip.log").read_text() == log


def test_a_failed_stage_says_so_on_its_line(tmp_path, fake_stages, monkeypatch, capsys):
    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "_stage",
                        lambda name: Stage(name, broken) if name == "translate" else _fake_stage(name))
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_stages(config.load(None, [f"output_dir={tmp_path / 'out'}"]))
    lines = capsys.readouterr().err.splitlines()
    assert [LINE.match(line)[1] for line in lines] == ["prepare", "translate"]
    assert LINE.match(lines[1])[2].startswith("failed after ")


def test_terminal_line_is_redrawn_in_place(monkeypatch):
    monkeypatch.setattr(console, "REDRAW_SECONDS", 0)  # every report redraws
    monkeypatch.setenv("COLUMNS", "120")
    terminal = FakeTerminal()
    console.configure(stream=terminal)
    with console.stage("encode") as line:
        console.log("encode: actors starting")
        for done in range(0, 4001, 1000):
            console.progress(done, 4000, part="demo-tiny texts")
        console.warn("a warning keeps its own line")
        line.finish("done in 1.0s, 4000 rows")
    text = terminal.getvalue()
    frames = text.split(CLEAR)[1:]
    assert text.count("\n") == 2  # the warning's and the stage's last line: every other frame replaced the last
    assert frames[0] == "encode: 0:00"
    assert frames[1] == "encode: 0:00  actors starting"  # the stage's news, on its line
    counted = next(f for f in frames if "2000/4000" in f)
    assert "rows/s" in counted and "<" in counted and "demo-tiny texts" in counted  # rate, ETA, the part
    assert any(f.startswith("encode: 100%") for f in frames)
    assert re.fullmatch(r"\[newsclip [\d:]+\] warning: a warning keeps its own line\n", frames[-3])
    assert frames[-2].startswith("encode: 100%")  # drawn again under the warning
    assert re.fullmatch(r"\[newsclip [\d:]+\] encode: done in 1.0s, 4000 rows\n", frames[-1])
    assert all(len(f.rstrip("\n")) < 120 for f in frames)  # never wider than the terminal


def test_a_lazy_stage_with_nothing_to_say_prints_nothing(capsys):
    with console.stage("demo model", lazy=True):
        pass
    with console.stage("demo translator", lazy=True):
        console.log("demo translator: building")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"\[newsclip [\d:]+\] demo translator: done in [\d.]+s", lines[0])


def test_verbose_prints_every_message(capsys):
    console.configure(verbose=True, stream=FakeTerminal())  # a terminal, but plain lines: Ray's would tear them
    with console.stage("encode"):
        console.log("encode: 1024/4400 new rows stored")
        console.progress(1024, 4400)
    text = console._console.out().getvalue()
    lines = [line.split("] ", 1)[1] for line in text.splitlines()]
    assert lines[0] == "encode: 1024/4400 new rows stored" and lines[1].startswith("encode: done in")
    assert CLEAR not in text


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_loggers_go_to_the_log_folder(tmp_path, verbose):
    import ray  # noqa: F401 - sets up the `ray` logger and its console handler

    # handlers, not captured text: Ray's console handler holds whichever stderr existed when it was made
    ray_logger = logging.getLogger("ray")
    before = list(ray_logger.handlers)
    assert _console_handlers(ray_logger)
    console.configure(verbose=verbose)
    with ray_logs(tmp_path / "logs"):
        during = _console_handlers(ray_logger)
        logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset x: a -> b")
        ray_logger.warning("Token authentication is enabled")
    written = (tmp_path / "logs" / RAY_LOG).read_text()
    assert "Execution plan of Dataset x" in written and "Token authentication" in written
    assert bool(during) == verbose  # off the console unless --verbose
    assert ray_logger.handlers == before  # the run's routing is undone
    ray_logger.warning("after the run")
    assert "after the run" not in (tmp_path / "logs" / RAY_LOG).read_text()


def test_errors_the_cluster_sends_go_to_the_log_not_the_console(tmp_path, capsys):
    """Ray prints the errors its GCS publishes ("(raylet) A worker died ...") to stdout whatever log_to_driver says;
    during a run they go to ray.log, and afterwards Ray prints them again."""
    from ray._private import worker

    from newsclip.runtime import ray_setup

    original = worker.print_to_stdstream
    with ray_logs(tmp_path / "logs"):
        ray_setup._routing.route_cluster_errors()
        worker.print_to_stdstream({"lines": ["A worker died"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert "A worker died" not in capsys.readouterr().out
    assert "(raylet) A worker died" in (tmp_path / "logs" / RAY_LOG).read_text()
    assert worker.print_to_stdstream is original


# A run that starts its own local Ray, through the CLI in a process of its own, prints its stage lines and nothing of
# Ray's (Ray's lines go to OUTPUT/logs): tests/test_chaos.py checks that on the driver it kills.


def test_the_command_exits_without_teardown_but_after_atexit_and_flushed_output(tmp_path):
    """`newsclip` ends with exit_now: atexit handlers still run (logging, Ray's shutdown), output is not lost, the
    exit status is kept; only Python's module teardown (1-1.5 s with torch) is skipped."""
    marker = tmp_path / "atexit-ran"
    script = ("import atexit, pathlib, sys\n"
              "from newsclip.cli import exit_now\n"
              f"atexit.register(pathlib.Path({str(marker)!r}).touch)\n"
              "sys.stdout.write('partial line without newline')\n"
              "exit_now(3)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, marker.exists()) == (3, "partial line without newline", True)
