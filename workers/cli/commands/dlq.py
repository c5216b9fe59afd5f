"""`usermgmt dlq list|show|retry|purge`: look at dead letters, retry them once fixed, drop them."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import orjson
from rich.table import Table

from usermgmt.domain.errors import DeadLetterReason
from usermgmt.workers.cli.commands.base import (
    CommandFailed,
    Subparsers,
    UsageError,
    connected,
    count,
    settings_from,
)
from usermgmt.workers.cli.commands.ops import make_console
from usermgmt.workers.ops import dlq

REASONS = [str(reason) for reason in DeadLetterReason]  # a typo is a usage error

DEFAULT_LIMIT = 100
MAX_LIMIT = 1_000_000
MESSAGE_WIDTH = 70


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "dlq",
        help="list, show, retry or purge dead letters",
        description="Dead letters are entries the worker could not apply, kept on "
        "<prefix>:dlq with a reason code and a message. Fix the cause (register the user, "
        "publish the missing update), then `retry` re-publishes the original payload to "
        "its stream and removes the letter.",
    )
    commands = parser.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    list_ = commands.add_parser("list", help="list dead letters, oldest first")
    list_.add_argument("--reason", choices=REASONS, help="only letters with this reason code")
    list_.add_argument(
        "--limit",
        type=count(1, MAX_LIMIT),
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"show at most N letters (default {DEFAULT_LIMIT})",
    )
    list_.add_argument("--json", action="store_true", help="print a JSON array")
    list_.set_defaults(func=cmd_list)

    show = commands.add_parser("show", help="show one dead letter with its payload")
    show.add_argument(
        "id", type=entry_id, metavar="ID", help="the letter's id in the dead-letter stream"
    )
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(func=cmd_show)

    retry = commands.add_parser(
        "retry",
        help="re-publish dead letters to their streams and remove them",
        description="Re-publish a letter's original payload to the event stream it came from "
        "(XADD) and delete the letter, atomically. Auth requests cannot be retried (their "
        "password was removed) and payloads that can never apply are refused. Exit 1 when "
        "any letter could not be retried.",
    )
    retry.add_argument("id", nargs="?", type=entry_id, metavar="ID", help="the letter to retry")
    retry.add_argument("--all", action="store_true", help="retry every letter (see --reason)")
    retry.add_argument(
        "--reason", choices=REASONS, help="with --all: only letters with this reason"
    )
    retry.set_defaults(func=cmd_retry)

    purge = commands.add_parser("purge", help="delete dead letters for good")
    purge.add_argument("--reason", choices=REASONS, help="only letters with this reason code")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=cmd_purge)


def entry_id(value: str) -> str:
    """An argparse type: a stream entry id, `<ms>-<seq>` (as `dlq list` shows them)."""
    parts = value.split("-")
    if not re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", value) or max(map(int, parts)) >= 2**64:
        raise argparse.ArgumentTypeError(
            f"not a dead letter id: {value!r} (ids look like 1733312130123-0; see `dlq list`)"
        )
    return value


def cmd_list(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with connected(settings, database=False) as services:
        shown: list[dlq.Letter] = []
        total = 0
        for letter in dlq.letters(services.redis, services.keys, args.reason):
            total += 1
            if len(shown) < args.limit:
                shown.append(letter)
    if args.json:
        write_json([letter.to_json() for letter in shown])
        return 0
    console = make_console()
    if not shown:
        console.print("no dead letters" + (f" with reason {args.reason!r}" if args.reason else ""))
        return 0
    table = Table()
    for column in ("id", "failed at", "stream", "reason", "deliveries", "message"):
        table.add_column(column, no_wrap=column != "message", max_width=MESSAGE_WIDTH)
    for letter in shown:
        table.add_row(
            letter.id,
            letter.failed_at[:19],
            letter.stream.rsplit(":", 1)[-1],
            letter.reason,
            "" if letter.deliveries is None else str(letter.deliveries),
            letter.message,
        )
    console.print(table)
    if total > len(shown):
        console.print(f"showing {len(shown)} of {total}; use --limit to see more")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with connected(settings, database=False) as services:
        try:
            letter = dlq.get_letter(services.redis, services.keys, args.id)
        except dlq.LetterNotFound as exc:
            raise CommandFailed(str(exc)) from None
    data = letter.to_json(parse_payload=True)
    if args.json:
        write_json(data)
        return 0
    for field in ("id", "stream", "entry_id", "reason", "message", "deliveries", "failed_at"):
        print(f"{field:>10}: {data[field]}")
    payload = data["payload"]
    if isinstance(payload, dict | list):
        payload = orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode()
    print(f"{'payload':>10}: {payload}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.all):
        raise UsageError("dlq retry: give one letter ID or --all")
    if args.reason and not args.all:
        raise UsageError("dlq retry: --reason goes with --all")
    settings = settings_from(args)
    refused = 0
    retried = 0
    with connected(settings, database=False) as services:
        redis, keys = services.redis, services.keys
        ids = [args.id] if args.id else [x.id for x in dlq.letters(redis, keys, args.reason)]
        for letter_id in ids:
            try:
                entry_id = dlq.retry(redis, keys, letter_id)
            except dlq.LetterNotFound as exc:
                if args.id:
                    raise CommandFailed(str(exc)) from None
                continue  # retried or purged by someone else meanwhile
            except dlq.NotRetryable as exc:
                refused += 1
                print(f"not retried: {exc}", file=sys.stderr)
                continue
            retried += 1
            print(f"retried {letter_id} as entry {entry_id}")
    if args.all:
        print(f"retried {retried} letter(s), {refused} not retryable")
    return 1 if refused else 0


def cmd_purge(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    what = f"dead letters with reason {args.reason!r}" if args.reason else "all dead letters"
    with connected(settings, database=False) as services:
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError(f"dlq purge would delete {what}; pass --yes to confirm")
            answer = input(f"delete {what} from {services.keys.dlq}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        try:
            deleted = dlq.purge(services.redis, services.keys, args.reason)
        except dlq.NotRetryable as exc:
            raise CommandFailed(str(exc)) from None
    print(f"deleted {deleted} dead letter(s)")
    return 0


def write_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
