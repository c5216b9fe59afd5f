"""The auth server's worker threads: bcrypt runs here, at a lower CPU priority.

bcrypt releases the GIL, so a pool of threads hashes several passwords at once and
one slow request never stalls the others.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import structlog

log = structlog.get_logger("usermgmt.auth")

Priority = Literal["idle"] | int


def hashing_pool(threads: int, priority: Priority) -> ThreadPoolExecutor:
    """A pool of `threads` threads named `auth_N`, each lowered to `priority` at start."""
    return ThreadPoolExecutor(
        threads,
        thread_name_prefix="auth",
        initializer=lower_priority,
        initargs=(priority,),
    )


def lower_priority(priority: Priority) -> None:
    """Run this auth thread at a lower CPU priority than the event consumer.

    bcrypt keeps a core busy for its whole cost; on a small machine a login flood
    would otherwise starve the event thread. `idle` is Linux's SCHED_IDLE: the thread
    runs when no other thread wants the core, and gives it up the moment one does
    (a nice value only lowers its share: a woken event thread could still wait for a
    bcrypt thread's time slice to end). A number is a nice value (0: unchanged).
    Linux applies both per thread; elsewhere `idle` falls back to nice 19 where
    nice exists, and otherwise this does nothing.
    """
    if priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            log.warning("could not move an auth thread to SCHED_IDLE; trying nice 19")
        else:
            return
    nice = 19 if priority == "idle" else priority
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        log.warning("could not lower the priority of an auth thread", nice=nice)
