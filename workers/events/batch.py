"""One batch of event entries: checked, decided in one transaction, sorted out.

- an entry delivered `max_deliveries` times without a decision, or whose payload is
  invalid, is dead-lettered without reaching the database (`Applier.check`);
- the database being away pauses the batch until it is back, or until shutdown is
  asked (`Interrupted`); a batch that fails otherwise is applied entry by entry, so
  one poison entry holds no other back, and its failures count as deliveries
  (`Applier.apply`);
- every decided entry is acked, a dead one dead-lettered too; the rest wait, held by
  this consumer (`Applier.sort_out`).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from structlog.typing import FilteringBoundLogger

from usermgmt.domain.errors import DeadLetterReason, InvalidPayload
from usermgmt.domain.events import parse_event
from usermgmt.domain.games import Outcome, PlannedEntry
from usermgmt.workers.events.intake import Intake, Key
from usermgmt.workers.events.store import Applied, EventStore, Packer
from usermgmt.workers.runtime.connections import DATABASE_ERRORS, database_unreachable
from usermgmt.workers.runtime.settings import Settings
from usermgmt.workers.runtime.streams import Backoff, Entry

DeadLetter = tuple[Entry, str, str]  # the entry, its reason, the message


class Interrupted(Exception):
    """Shutdown was requested while the batch in hand waited for the database."""


@dataclass
class Batch:
    """One batch's entries on their way from the streams to their acks."""

    parsed: dict[Key, Entry] = field(default_factory=dict)  # valid, not decided yet
    planned: list[PlannedEntry] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    acks: list[Entry] = field(default_factory=list)  # decided, or dead before the commit
    outcomes: list[tuple[str, str]] = field(default_factory=list)  # (stream, outcome)
    applied: int = 0
    duplicates: int = 0
    applied_ms: list[tuple[str, int]] = field(default_factory=list)  # (stream, entry-id ms)


class Applier:
    """Decides batches of the entries `intake` has ready, and gives back what waits."""

    def __init__(
        self,
        store: EventStore,
        intake: Intake,
        settings: Settings,
        stop: threading.Event,
        log: FilteringBoundLogger,
        pack: Packer | None = None,
    ) -> None:
        self.store = store
        self.intake = intake
        self.settings = settings
        self.stop = stop
        self.log = log
        self.pack = pack  # a batch's cache writes, packed while it commits
        self.failures: Counter[Key] = Counter()  # deliveries that ended without a decision

    def check(self, entries: list[Entry]) -> Batch:
        """Parse and plan the entries; dead-letter those delivered too often or invalid.

        An entry delivered too often whose decision was committed (a worker crashed, over
        and over, between a commit and its acks) is not dead-lettered: it has been
        decided, and is planned again to be acked as such (`exhausted`).
        """
        batch = Batch()
        exhausted: list[tuple[Entry, PlannedEntry]] = []
        for entry in entries:
            key = self.intake.key(entry)
            over = entry.deliveries + self.failures[key] > self.settings.max_deliveries
            try:
                event = parse_event(self.intake.kinds[entry.stream], entry.payload)
            except InvalidPayload as exc:
                if over:
                    self.exhaust(batch, entry, key)
                else:
                    batch.dead.append((entry, exc.reason, exc.message))
                continue
            except Exception as exc:  # a bug reading it: never an entry that stops the worker
                self.log.exception("entry could not be read", entry_id=entry.entry_id)
                message = f"the payload could not be read ({type(exc).__name__})"
                batch.dead.append((entry, DeadLetterReason.INVALID_EVENT, message))
                continue
            planned = PlannedEntry(
                event, key[0], entry.entry_id, entry.payload, entry.deliveries > 1
            )
            if over:
                exhausted.append((entry, planned))
                continue
            batch.parsed[key] = entry
            batch.planned.append(planned)
        if exhausted:
            self.plan_decided(batch, exhausted)
        return batch

    def plan_decided(self, batch: Batch, exhausted: list[tuple[Entry, PlannedEntry]]) -> None:
        """Entries delivered too often: those decided already are planned (to be acked as
        the planner decides them again: a duplicate, or their recorded dead letter), the
        rest dead-lettered as `max_deliveries`."""
        decided = self.store.decided_already(
            [(p.stream_kind, p.entry_id, p.event_id) for _, p in exhausted]
        )
        for entry, planned in exhausted:
            key = (planned.stream_kind, planned.entry_id)
            if key in decided:
                batch.parsed[key] = entry
                batch.planned.append(planned)
            else:
                self.exhaust(batch, entry, key)
        batch.planned.sort(key=lambda planned: planned.order)

    def exhaust(self, batch: Batch, entry: Entry, key: Key) -> None:
        entry.deliveries += self.failures[key]
        message = f"delivered {entry.deliveries} times without being decided"
        batch.dead.append((entry, DeadLetterReason.MAX_DELIVERIES, message))

    def apply(self, batch: Batch) -> list[Applied]:
        """Commit the batch; the database being away pauses here until it is back."""
        backoff = Backoff()
        while True:
            try:
                now = datetime.now(UTC)
                applied = self.store.apply(batch.planned, self.intake.horizon_ms, now, self.pack)
                backoff.recovered(self.log, "the database")
                return [applied]
            except DATABASE_ERRORS as exc:
                delay = backoff.retry(
                    self.log, database_unreachable(self.settings.database_url, exc)
                )
                if self.stop.wait(delay):
                    raise Interrupted from None
            except Exception as exc:
                # One entry is poison: isolate it so the others still apply.
                self.log.warning("batch failed; applying entries one by one", error=repr(exc))
                return self.apply_one_by_one(batch)

    def apply_one_by_one(self, batch: Batch) -> list[Applied]:
        """Each entry in its own transaction; one that fails again is not decided.

        It stays pending (and is read again after a pause); its failures count as
        deliveries, so a poison entry ends as `max_deliveries`.
        """
        results: list[Applied] = []
        failed = False
        for item in batch.planned:
            key = (item.stream_kind, item.entry_id)
            try:
                results.append(self.store.apply([item], self.intake.horizon_ms, datetime.now(UTC)))
            except DATABASE_ERRORS:
                raise
            except Exception as exc:
                self.log.exception("entry failed", entry_id=item.entry_id, error=repr(exc))
                entry = batch.parsed.pop(key)
                self.failures[key] += 1
                attempts = entry.deliveries + self.failures[key] - 1
                if attempts >= self.settings.max_deliveries:
                    entry.deliveries = attempts
                    message = f"failed to apply {attempts} times: {exc!r}"
                    batch.dead.append((entry, DeadLetterReason.MAX_DELIVERIES, message))
                else:
                    self.intake.buffer.append(entry)
                    failed = True
        if failed:
            self.stop.wait(self.settings.retry_delay_ms / 1000)
        return results

    def sort_out(self, batch: Batch, results: list[Applied]) -> None:
        """Ack every decided entry (dead-letter a dead one too); hold the rest, to wait.

        The entries dead-lettered before the commit are acked first.
        """
        batch.acks = [entry for entry, _, _ in batch.dead]
        held = self.intake.held
        for result in results:
            for item, decision in result.plan.decided:
                key = (item.stream_kind, item.entry_id)
                if key in batch.parsed:
                    entry = batch.parsed.pop(key)
                elif key in held:
                    entry = held.pop(key)
                else:
                    entry = self.stranger(item)
                self.failures.pop(key, 0)
                batch.acks.append(entry)
                batch.outcomes.append((entry.stream, decision.outcome))
                if decision.outcome is Outcome.DEAD:
                    assert decision.reason is not None
                    batch.dead.append((entry, decision.reason, decision.message))
                elif decision.outcome is Outcome.DUPLICATE:
                    batch.duplicates += 1
                else:
                    batch.applied += 1
                    batch.applied_ms.append((entry.stream, item.ms))
        held.update(batch.parsed)  # what was not decided waits

    def stranger(self, item: PlannedEntry) -> Entry:
        """A waiting entry another consumer holds, decided here (acked by id, like any)."""
        return Entry(self.intake.stream_of[item.stream_kind], item.entry_id, item.payload)
