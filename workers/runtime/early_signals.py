"""SIGTERM and SIGINT that arrive before the program can act on them.

An orchestrator may stop a worker the moment its process exists, but importing the
worker takes a few hundred milliseconds before `Worker.run` installs its handlers: a
signal then killed the process (-15) instead of the promised clean exit 0.

The command line calls `hold()` on its first line, so such signals are recorded
instead. `Worker.run` installs its own handlers and `take()`s what was recorded, as
if it had arrived just then. Any other command gets `release()`d: its handlers are
given back and what was recorded is delivered again, so it behaves as before.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[int] = []
_previous: dict[int, Any] = {}


def hold() -> None:
    """Record SIGTERM and SIGINT until `take` or `release` (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or _previous:
        return
    for signum in STOP_SIGNALS:
        _previous[signum] = signal.signal(signum, _record)


def take() -> list[int]:
    """The signals recorded so far; the caller has installed its own handlers."""
    received = list(_received)
    _received.clear()
    _previous.clear()
    return received


def release(deliver: bool = True) -> None:
    """Give the handlers back and, if `deliver`, raise the recorded signals again."""
    if not _previous:
        return
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    for signum in take():
        if deliver:
            signal.raise_signal(signum)


def _record(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)
