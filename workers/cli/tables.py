"""What people read on a terminal: rich tables, and progress that suits where it goes
(a live bar on a terminal, a few plain lines in a log or a pipe)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from usermgmt.persistence.standings import PlayerRecord, Standing


def stdout_console() -> Console:
    """Tables go to stdout; without a terminal rich writes plain text, no colour codes."""
    return Console(highlight=False)


def number(value: int) -> str:
    """`12345` → `12,345`."""
    return f"{value:,}"


def leaderboard_table(
    rows: Sequence[Standing], total: int, highlight: str | None = None, title: str | None = None
) -> Table:
    """Rank, player, earnings, wins, losses, wallet; `highlight` marks one player's row."""
    table = Table(
        title=title or f"Leaderboard ({number(total)} players)",
        box=box.SIMPLE_HEAVY,
        title_justify="left",
    )
    table.add_column("rank", justify="right")
    table.add_column("player")
    table.add_column("earnings", justify="right")
    table.add_column("wins", justify="right")
    table.add_column("losses", justify="right")
    table.add_column("wallet", justify="right")
    marked = highlight.lower() if highlight else None
    for row in rows:
        is_marked = marked is not None and row.username.lower() == marked
        table.add_row(
            str(row.rank),
            f"{row.username} ◀" if is_marked else row.username,
            number(row.earnings),
            number(row.win_count),
            number(row.loss_count),
            number(row.wallet),
            style="bold" if is_marked else None,
        )
    return table


def user_table(record: PlayerRecord) -> Table:
    """One player's record, field by field."""
    table = Table(title=f"User {record.username}", box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("field")
    table.add_column("value")
    games = record.win_count + record.loss_count
    win_rate = f" ({record.win_count / games:.0%} won)" if games else ""
    table.add_row("id", str(record.id))
    table.add_row("username", record.username)
    table.add_row("rank", str(record.rank))
    table.add_row("earnings", number(record.earnings))
    table.add_row("wins", number(record.win_count) + win_rate)
    table.add_row("losses", number(record.loss_count))
    table.add_row("wallet", number(record.wallet))
    if record.session is None:
        table.add_row("session", "none")
    else:
        session = record.session
        table.add_row("session", f"{session.session_id} ({session.status})")
        table.add_row("  players", ", ".join(session.players))
        if session.meta:
            table.add_row("  meta", ", ".join(f"{k}={v}" for k, v in session.meta.items()))
    return table


def summary_table(title: str, items: Sequence[tuple[str, str]]) -> Table:
    """A two-column table of labelled figures."""
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for label, value in items:
        table.add_row(label, value)
    return table


class ProgressReport:
    """Named counters shown as bars on a terminal, or as occasional plain lines."""

    def __init__(self, progress: Progress | None, stream: TextIO, plain_every_s: float) -> None:
        self.progress = progress
        self.stream = stream
        self.plain_every_s = plain_every_s
        self.tasks: dict[str, tuple[TaskID | None, int]] = {}
        self.last_line: dict[str, float] = {}
        self.started: dict[str, float] = {}

    def add(self, name: str, label: str, total: int) -> None:
        """Start counting `name` up to `total`."""
        task = self.progress.add_task(label, total=total, note="") if self.progress else None
        self.tasks[name] = (task, total)
        self.started[name] = self.last_line[name] = time.monotonic()

    def update(self, name: str, done: int, note: str = "") -> None:
        """Set `name`'s count; plain output prints at most one line per interval."""
        task, total = self.tasks[name]
        if self.progress is not None and task is not None:
            self.progress.update(task, completed=done, note=note)
            return
        now = time.monotonic()
        if done < total and now - self.last_line[name] < self.plain_every_s:
            return
        self.last_line[name] = now
        percent = f"{done / total:.0%}" if total else "100%"
        extra = f", {note}" if note else ""
        elapsed = now - self.started[name]
        print(
            f"{name}: {done:,}/{total:,} ({percent}){extra}, {elapsed:.1f} s",
            file=self.stream,
            flush=True,
        )


@contextmanager
def progress_report(
    stream: TextIO | None = None, plain_every_s: float = 2.0
) -> Iterator[ProgressReport]:
    """A live rich progress display when `stream` (default stderr) is a terminal."""
    out = stream or sys.stderr
    if not out.isatty():
        yield ProgressReport(None, out, plain_every_s)
        return
    progress = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=Console(file=out),
        transient=False,
    )
    with progress:
        yield ProgressReport(progress, out, plain_every_s)
