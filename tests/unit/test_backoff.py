"""An outage is said in few lines: its first failure, a reminder a minute, its end."""

from __future__ import annotations

from typing import Any

import pytest

from usermgmt.workers.runtime import backoff as backoff_module
from usermgmt.workers.runtime.backoff import REMIND_EVERY_S, Backoff


class Lines:
    """A logger that keeps (level, message, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda message, **fields: self.lines.append((level, message, fields))


def test_an_outage_is_one_error_then_a_reminder_a_minute_then_one_line_at_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(backoff_module.time, "monotonic", lambda: now[0])
    log, backoff = Lines(), Backoff(first=0.2, cap=10.0)
    delays = []
    for _ in range(12):  # 0.2, 0.4 ... 10 s: 72.6 s of failures
        delays.append(backoff.retry(log, "cannot reach Redis", error="refused"))  # type: ignore[arg-type]
        now[0] += delays[-1]
    assert delays[:7] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    errors = [(message, fields) for level, message, fields in log.lines if level == "error"]
    assert errors == [
        ("cannot reach Redis", {"retry_in_s": 0.2, "error": "refused"}),
        ("cannot reach Redis", {"retry_in_s": 10.0, "error": "refused", "down_s": 62.6}),
    ]
    assert sum(level == "debug" for level, _, _ in log.lines) == 10
    assert now[0] - 1000.0 > REMIND_EVERY_S

    backoff.recovered(log, "the event consumer")  # type: ignore[arg-type]
    assert log.lines[-1] == ("info", "the event consumer works again", {"down_s": 72.6})
    assert backoff.next_delay() == 0.2  # a new outage starts over


def test_success_without_an_outage_says_nothing() -> None:
    log, backoff = Lines(), Backoff()
    backoff.recovered(log, "the event consumer")  # type: ignore[arg-type]
    assert log.lines == []
