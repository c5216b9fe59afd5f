"""The auth server's worker threads: bcrypt runs here, at a lower CPU priority.

bcrypt releases the GIL, so a pool of threads hashes several passwords at once and
one slow request never stalls the others.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import structlog

log = structlog.get_logger("usermgmt.auth")


def hashing_pool(threads: int, nice: int) -> ThreadPoolExecutor:
    """A pool of `threads` threads named `auth_N`, each lowered by `nice` at start."""
    return ThreadPoolExecutor(
        threads,
        thread_name_prefix="auth",
        initializer=lower_priority,
        initargs=(nice,),
    )


def lower_priority(nice: int) -> None:
    """Run this auth thread at a lower CPU priority than the event consumer.

    bcrypt keeps a core busy for its whole cost; on a small machine a login flood
    would otherwise starve the event thread. Linux applies nice per thread; elsewhere
    this does nothing.
    """
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        log.warning("could not lower the priority of an auth thread", nice=nice)
