"""`usermgmt publish update|terminate [FILE|-]`: publish events from JSON lines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import orjson

from usermgmt.domain.events import EventKind, GameEvent
from usermgmt.workers.cli.commands.base import CommandFailed, Subparsers, connected, settings_from
from usermgmt.workers.client.publisher import (
    InvalidEvent,
    Publisher,
    PublishFailed,
    build_event,
)
from usermgmt.workers.runtime.connections import REDIS_ERRORS, redis_unreachable

CHUNK = 500  # events per MULTI/EXEC round trip
MAX_ERRORS_SHOWN = 20


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "publish",
        help="publish update or terminate events from JSON lines (a file or stdin)",
        description="Read one event per line (JSON objects as in the spec; blank lines "
        "are skipped), validate every line with the worker's schemas, add an event_id "
        "where one is missing, and publish them in order. All or nothing: when any line "
        "is invalid, every bad line is reported with its number and nothing is published "
        "(exit 1).",
    )
    parser.add_argument("kind", choices=[kind.value for kind in EventKind], help="event type")
    parser.add_argument(
        "file",
        nargs="?",
        default="-",
        metavar="FILE",
        help="JSON-lines file; '-' or nothing reads stdin",
    )
    parser.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    kind = EventKind(args.kind)
    events, errors = parse_lines(kind, read_lines(args.file))
    if errors:
        for line, message in errors[:MAX_ERRORS_SHOWN]:
            print(f"line {line}: {message}", file=sys.stderr)
        if len(errors) > MAX_ERRORS_SHOWN:
            print(f"... and {len(errors) - MAX_ERRORS_SHOWN} more", file=sys.stderr)
        raise CommandFailed(
            f"{len(errors)} invalid line(s) in {source_name(args.file)}; nothing was published"
        )
    published = 0
    with connected(settings, database=False) as services:
        publisher = Publisher(services.redis, settings.key_prefix)
        stream = publisher.keys.event_stream(kind)
        try:
            for start in range(0, len(events), CHUNK):
                with publisher.batch() as batch:
                    for event in events[start : start + CHUNK]:
                        batch.add_event(event)
                published += len(batch.events)
        except PublishFailed as exc:
            added, unknown = published + len(exc.published), len(exc.unknown)
            raise CommandFailed(
                f"Redis refused the publish to {stream}: {exc.error}; "
                + outcome(added, unknown, len(events))
            ) from None
        except REDIS_ERRORS as exc:
            unknown = min(CHUNK, len(events) - published)
            raise CommandFailed(
                f"{redis_unreachable(settings.redis_url, exc)}; "
                + outcome(published, unknown, len(events))
            ) from None
    print(f"published {published} {kind} event(s) to {stream}")
    return 0


def outcome(added: int, unknown: int, total: int) -> str:
    """What reached the stream, for the one line of a failed publish."""
    if unknown:
        return (
            f"{added} of {total} event(s) were published and the next {unknown} may have "
            "been: look at the stream before publishing again (a line without an event_id "
            "gets a new one each time, so it would be applied twice)"
        )
    if added:
        return f"{added} of {total} event(s) were published, the others were not"
    return "nothing was published"


def read_lines(file: str) -> list[str]:
    """The lines of FILE, or of stdin for '-'."""
    if file == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CommandFailed(f"cannot read {file}: {reason}") from None


def parse_lines(
    kind: EventKind, lines: Iterable[str]
) -> tuple[list[GameEvent], list[tuple[int, str]]]:
    """Validated events (with their event ids filled in) and (line number, error) pairs."""
    events: list[GameEvent] = []
    errors: list[tuple[int, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            errors.append((number, f"not JSON ({exc})"))
            continue
        try:
            event = build_event(kind, data)
        except InvalidEvent as exc:
            errors.append((number, str(exc)))
            continue
        events.append(event)
    return events, errors


def source_name(file: str) -> str:
    return "stdin" if file == "-" else file
