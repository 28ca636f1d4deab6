"""The index a server answers from, following the job's runs: when a run finishes, its snapshot is built off to the
side and swapped in with one assignment. Requests keep the snapshot they started with, so none sees a half-swapped
index, and a run that fails or is interrupted leaves the last good snapshot serving."""

from __future__ import annotations

import threading

from newsclip.config import JobConfig
from newsclip.runtime.console import log, warn
from newsclip.runtime.store import read_manifest
from newsclip.serve.index import IndexNotReady, Snapshot, load_snapshot

POLL_S = 5.0  # how often the manifest is read (a few kB) for a new finished run


class IndexFollower:
    """`current`: the snapshot of the job's last finished run (None until there is one)."""

    def __init__(self, cfg: JobConfig, poll_s: float = POLL_S):
        self.cfg, self.poll_s = cfg, poll_s
        self.current: Snapshot | None = None
        self.waiting: str | None = None  # why a newer run is not served yet (or why nothing is)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refreshing = threading.Lock()

    def refresh(self) -> bool:
        """Swap to the last finished run if it is not the one served; True when it swapped."""
        with self._refreshing:
            runs = read_manifest(self.cfg.output).get("runs", [])
            last = runs[-1].get("run_id") if runs else None
            if self.current is not None and last == self.current.run_id:
                self.waiting = None
                return False
            try:
                snapshot = load_snapshot(self.cfg, serving=True)
            except IndexNotReady as e:
                if str(e) != self.waiting:
                    (warn if self.current is None else log)(f"serve: {e}; still serving "
                                                            f"{self.current.run_id if self.current else 'nothing'}")
                self.waiting = str(e)
                return False
            if self.current is not None and snapshot.run_id == self.current.run_id:
                return False
            self.current, self.waiting = snapshot, None  # the swap: one reference
            log(f"serve: index of run {snapshot.run_id} ({snapshot.sizes()})")
            return True

    def start(self) -> None:
        """Load now, then poll in a background thread."""
        self.refresh()
        if self._thread is None and self.poll_s > 0:
            self._thread = threading.Thread(target=self._poll, name="newsclip-index-follower", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - a bad night must not stop the server following the next
                warn(f"serve: reading the index failed ({type(e).__name__}: {e}); still serving "
                     f"{self.current.run_id if self.current else 'nothing'}")


class StaticIndex:
    """One fixed snapshot (benchmarks, tests): the follower's interface without a job."""

    def __init__(self, snapshot: Snapshot):
        self.current, self.waiting, self.cfg = snapshot, None, None

    def refresh(self) -> bool:
        return False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass
