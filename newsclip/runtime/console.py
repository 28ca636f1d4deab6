"""What a run tells the person who started it: timestamped lines on stderr."""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    print(f"[newsclip {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
