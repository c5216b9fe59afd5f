"""The bcrypt threads' CPU priority (`USERMGMT_AUTH_NICE`), as Linux sees each thread."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from usermgmt.workers.auth.pool import Priority, hashing_pool

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's"
)


def scheduling_of_a_pool_thread(priority: Priority) -> tuple[int, int, str]:
    """(policy, nice, thread name) of one of the pool's threads, read from inside it."""

    def read() -> tuple[int, int, str]:
        tid = threading.get_native_id()
        return (
            os.sched_getscheduler(tid),
            os.getpriority(os.PRIO_PROCESS, tid),
            threading.current_thread().name,
        )

    pool = hashing_pool(1, priority)
    try:
        return pool.submit(read).result(timeout=10)
    finally:
        pool.shutdown()


def test_idle_runs_the_bcrypt_threads_at_sched_idle() -> None:
    policy, _, name = scheduling_of_a_pool_thread("idle")
    assert policy == os.SCHED_IDLE
    assert name.startswith("auth")


def test_a_number_is_a_nice_value_of_the_pool_threads_only() -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    policy, nice, _ = scheduling_of_a_pool_thread(7)
    assert policy == os.SCHED_OTHER
    assert nice == 7 or (mine > 7 and nice == mine)  # raising it back needs privileges
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_zero_leaves_the_priority_alone() -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    policy, nice, _ = scheduling_of_a_pool_thread(0)
    assert (policy, nice) == (os.SCHED_OTHER, mine)
