"""Fault injection for the crash-safety tests: die with a real SIGKILL at a named point.

`CLS_CRASH_AT="<point>#<n>"` kills the process the n-th time `crash_point("<point>")` runs (1-based),
e.g. `write:last.pt#2` half-way through the second write of last.pt, `step#7` after the 7th optimizer
step. Unset (always, outside tests) it costs one dict lookup. SIGKILL cannot be caught, so nothing
(no finally, no atexit, no buffered flush) runs after it: exactly what a power cut or OOM-killer does.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CLS_CRASH_AT"
_seen: Counter[str] = Counter()


def crash_point(name: str) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    _seen[name] += 1
    if target == f"{name}#{_seen[name]}":
        os.kill(os.getpid(), signal.SIGKILL)
