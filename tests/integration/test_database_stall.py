"""A database that stops answering mid-transaction (a stopped server, frozen storage)
is waited for without end: no driver read timeout ends it. The worker says so once the
event consumer's transaction has waited `STALL_WARN_S`, and again when it is answered."""

from __future__ import annotations

import threading
import time

import pytest
import structlog

from tests.conftest import Backend, all_logs
from usermgmt.workers.events.consumer import EventConsumer
from usermgmt.workers.runtime import runner
from usermgmt.workers.runtime.bootstrap import Services
from usermgmt.workers.runtime.runner import Worker


def test_a_transaction_the_database_holds_too_long_is_reported_once_then_its_end(
    services: Services, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "STALL_WARN_S", 0.3)
    worker = Worker(services, "w1")
    worker.events = EventConsumer(services, "w1", threading.Event())
    store = worker.events.store
    with all_logs() as logs:
        worker.log = structlog.get_logger("usermgmt.worker").bind(consumer="w1")
        with store.transaction():
            worker._watch_database()  # just begun: nothing to say
            time.sleep(0.4)
            worker._watch_database()
            worker._watch_database()  # still the same stall: said once
        worker._watch_database()
        with store.transaction():
            worker._watch_database()  # a new transaction, not stalled
        worker._watch_database()
    store.close()
    said = [(log["log_level"], log["event"], log.get("waited_s")) for log in logs]
    assert [(level, event.split(";")[0]) for level, event, _ in said] == [
        ("error", "the database has not answered the event consumer for a while"),
        ("info", "the database answered the event consumer again"),
    ]
    assert said[0][2] is not None and said[0][2] >= 0.3
    assert "is the server or its storage hung?" in said[0][1]
