"""The running stage's clock: the runner starts it, and each manifest entry a stage records reads its own seconds off
it, so that no stage times itself."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

_started: tuple[int, float] | None = None  # (which stage run, when it started) while the runner runs a stage
_runs = 0
_laps = threading.local()  # per thread: (which stage run, when its last entry was recorded)


@contextlib.contextmanager
def running() -> Iterator[None]:
    """The clock runs while a stage does its work (a run inside a run gets the outer clock back at its end)."""
    global _started, _runs
    before = _started
    _runs += 1
    _started = (_runs, time.perf_counter())
    try:
        yield
    finally:
        _started = before


def lap() -> float | None:
    """Seconds of the work behind the entry being recorded now: since this thread's last entry in this stage run, or
    since the stage started (so a backbone's images count from its texts' entry, also when backbones are encoded
    side by side, one thread each); None outside a stage that the runner runs."""
    if _started is None:
        return None
    run, started = _started
    now = time.perf_counter()
    last = getattr(_laps, "last", None)
    since = last[1] if last is not None and last[0] == run else started
    _laps.last = (run, now)
    return round(now - since, 2)
