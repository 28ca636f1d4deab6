"""What a run tells the person who started it: one line per stage on stderr (redrawn in place on a terminal, with
rows done/total, rate and ETA; printed once, when the stage ends, otherwise), warnings, and every message in the
run's log file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TextIO

from newsclip.runtime.layout import Layout

# a terminal line is redrawn at most this often when work reports progress, and once a second when it does not
# (so that the elapsed time moves while an actor pool starts)
REDRAW_SECONDS = 0.1
TICK_SECONDS = 1.0
CLEAR = "\r\x1b[K"  # back to the start of the line, then erase it


def _stamp() -> str:
    return f"[newsclip {time.strftime('%H:%M:%S')}]"


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Stage:
    """One stage's line: what is done of what there is (per part, e.g. a backbone's texts), and its latest news."""

    def __init__(self, name: str, lazy: bool = False) -> None:
        self.name = name
        self.lazy = lazy  # shown only once something is reported (a helper that has nothing to do stays silent)
        self.started = time.monotonic()
        self.parts: dict[str, tuple[int, int | None]] = {}
        self.unit = "rows"
        self.status = ""
        self.first: tuple[float, int] | None = None  # the first report: the rate leaves out the start-up before it
        self.outcome = ""

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def update(self, done: int, total: int | None = None, part: str = "", unit: str | None = None) -> None:
        """Set what is done (not added: a retried batch cannot count twice) of one part of the stage's work."""
        self.parts[part] = (done, total)
        self.unit = unit or self.unit
        self.lazy = False
        if self.first is None:
            self.first = (time.monotonic(), self.done)

    def finish(self, outcome: str) -> None:
        """What the stage's last line says after its name, e.g. `done in 4.2s, 2000 rows`."""
        self.outcome = outcome

    @property
    def done(self) -> int:
        return sum(done for done, _ in self.parts.values())

    @property
    def total(self) -> int | None:
        totals = [total for _, total in self.parts.values()]
        return None if not totals or None in totals else sum(totals)

    def rate(self) -> float | None:
        """Units a second since the first report."""
        if self.first is None:
            return None
        seconds, done = time.monotonic() - self.first[0], self.done - self.first[1]
        return done / seconds if seconds > 0.5 and done > 0 else None

    def line(self, width: int) -> str:
        """The live line: name, counts, rate and ETA (tqdm's meter) when there are counts, then the latest news."""
        news = f"  {self.status}" if self.status else ""
        if not self.parts:
            return f"{self.name}: {_clock(self.seconds)}{news}"[:width]
        from tqdm import tqdm

        part = next(reversed(self.parts))  # the part that reported last
        meter = tqdm.format_meter(self.done, self.total, self.seconds, ncols=max(40, width - len(news)),
                                  prefix=self.name, unit=f" {self.unit}", rate=self.rate(),
                                  postfix=part or None)
        return (meter + news)[:width]


class _Console:
    """The process's console: one at a time, shared by every thread (encode runs backbones side by side)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stages: list[Stage] = []
        self.files: list[_LogFile] = []
        self.configure()

    def configure(self, verbose: bool = False, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.verbose = verbose
        self.stream = stream  # None: sys.stderr when written to (which pytest's capsys replaces)
        self.interactive = interactive  # None: whether the stream is a terminal
        self.drawn = False  # a live line is on the screen
        self.last_draw = 0.0

    def out(self) -> TextIO:
        return self.stream or sys.stderr

    def live(self) -> bool:
        """Redraw a line in place? Only on a terminal, and not with --verbose: Ray's own lines would tear it."""
        if self.verbose:
            return False
        if self.interactive is not None:
            return self.interactive
        stream = self.out()
        return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"

    def to_files(self, line: str) -> None:
        for file in self.files:
            file.write(line)

    def print(self, line: str) -> None:
        """A line of its own; on a terminal, above the live line, which is drawn again under it."""
        with self.lock:
            stream = self.out()
            stream.write((CLEAR if self.drawn else "") + line + "\n")
            self.drawn = False
            self.draw(force=True)
            stream.flush()

    def draw(self, force: bool = False) -> None:
        with self.lock:
            if not self.stages or not self.live() or self.stages[-1].lazy:
                return
            now = time.monotonic()
            if not force and now - self.last_draw < REDRAW_SECONDS:
                return
            width = shutil.get_terminal_size((100, 24)).columns - 1  # never wrap: a wrapped line cannot be redrawn
            try:
                text = self.stages[-1].line(width)
            except Exception:  # noqa: BLE001 - a line that cannot be drawn must never fail the stage it shows
                text = f"{self.stages[-1].name}: {_clock(self.stages[-1].seconds)}"
            stream = self.out()
            stream.write(CLEAR + text)
            stream.flush()
            self.drawn, self.last_draw = True, now

    def tick(self, stage: Stage, stop: threading.Event) -> None:
        while not stop.wait(TICK_SECONDS):
            with self.lock:
                if self.stages and self.stages[-1] is stage:
                    self.draw(force=True)


_console = _Console()


def configure(verbose: bool = False, stream: TextIO | None = None, interactive: bool | None = None) -> None:
    """How the console behaves: `verbose` prints every message and Ray's own logs as plain lines; `stream` (default:
    stderr) and `interactive` (default: whether the stream is a terminal) are for tests."""
    with _console.lock:
        _console.configure(verbose, stream, interactive)


def is_verbose() -> bool:
    return _console.verbose


def log(message: str) -> None:
    """A message: in the log file always; on the console outside a stage, or with --verbose. Inside a stage it is the
    stage's latest news on its live line (a terminal), not a line of its own."""
    line = f"{_stamp()} {message}"
    with _console.lock:
        _console.to_files(line)
        if _console.stages and not _console.verbose:
            stage = _console.stages[-1]
            stage.status = message.removeprefix(f"{stage.name}: ")
            stage.lazy = False
            _console.draw()
            return
        _console.print(line)


def running_stage() -> str | None:
    """The name of the stage whose line the console shows now; None between stages."""
    with _console.lock:
        return _console.stages[-1].name if _console.stages else None


def note(message: str) -> None:
    """A line on the console only, for what did not happen (`knn: up to date`): a run with nothing to do leaves
    the log file as it was."""
    _console.print(f"{_stamp()} {message}")


def warn(message: str) -> None:
    """Something the person should act on or know about the results: always a line of its own."""
    line = f"{_stamp()} warning: {message}"
    with _console.lock:
        _console.to_files(line)
        _console.print(line)


def progress(done: int, total: int | None = None, *, part: str = "", unit: str | None = None) -> None:
    """The running stage has `done` of `total` units (rows by default) of `part` of its work; a stage with several
    parts (a backbone's texts and images) shows their sums. No running stage: nothing happens."""
    with _console.lock:
        if _console.stages:
            _console.stages[-1].update(done, total, part, unit)
            _console.draw()


def track(batches: Iterable, total: int | None = None, *, part: str = "", unit: str | None = None) -> Iterator:
    """The batches of an iterable, unchanged, reporting their summed lengths as progress."""
    done = 0
    progress(done, total, part=part, unit=unit)
    for batch in batches:
        done += len(batch)
        progress(done, total, part=part, unit=unit)
        yield batch


@contextlib.contextmanager
def stage(name: str, *, lazy: bool = False) -> Iterator[Stage]:
    """A stage's one line: live while it runs on a terminal, then `name: done in Xs` (or what `Stage.finish` set, or
    `failed after Xs`) in place, or as the only line printed for it elsewhere. A `lazy` stage shows nothing unless
    something inside it reports."""
    current = Stage(name, lazy)
    stop = threading.Event()
    with _console.lock:
        _console.stages.append(current)
        live = _console.live()
        _console.draw(force=True)
    if live:
        threading.Thread(target=_console.tick, args=(current, stop), daemon=True, name="newsclip-console").start()
    error = None
    try:
        yield current
    except BaseException as e:
        current.finish(f"interrupted after {current.seconds:.1f}s" if isinstance(e, KeyboardInterrupt) else
                       f"failed after {current.seconds:.1f}s")
        error = e
        raise
    finally:
        stop.set()
        with _console.lock:
            _console.stages.remove(current)
            if current.lazy and error is None:  # nothing reported: nothing to say
                _console.draw(force=True)
            else:
                line = f"{_stamp()} {name}: {current.outcome or f'done in {current.seconds:.1f}s'}"
                if error is not None and not isinstance(error, KeyboardInterrupt):
                    # the console's caller prints the error; the log must hold it too, with where it came from
                    _console.to_files(f"{line}: {type(error).__name__}: {error}")
                    _console.to_files("".join(traceback.format_exception(error)).rstrip("\n"))
                else:
                    _console.to_files(line)
                _console.print(line)


class _LogFile:
    """A log file opened (its folder made) at its first line: a run that has nothing to say makes no file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[str] | None = None

    def write(self, line: str) -> None:
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self.handle.write(line + "\n")
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[Path]:
    """Every message, stage line and warning also goes to `path` (appended) while this lasts."""
    file = _LogFile(path)
    with _console.lock:
        _console.files.append(file)
    try:
        yield path
    finally:
        with _console.lock:
            _console.files.remove(file)
        file.close()


def print_metrics(output: Path) -> None:
    """A job's metrics table (metrics.csv, the metrics metrics.json names) on standard output, checkpoint paths
    shortened as the report shortens them."""
    import polars as pl

    from newsclip.report.data import display_names

    layout = Layout(output)
    metrics = json.loads(layout.metrics_json.read_text())["metrics"]
    columns = ["backbone", "direction", "source", "n", *metrics]
    frame = pl.read_csv(layout.metrics_csv).select(columns)
    frame = frame.with_columns(pl.col("backbone").replace(display_names(frame["backbone"].unique().to_list())))
    with pl.Config(tbl_rows=1000, tbl_cols=len(columns), tbl_width_chars=200, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True, float_precision=3):
        print(frame)
