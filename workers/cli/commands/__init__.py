"""The subcommands of `usermgmt`; each module adds its parsers in `register`."""

from __future__ import annotations

import argparse

from usermgmt.workers.cli.commands import core, dlq, ops, play, publish, recovery


def register_all(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every subcommand, in the order `usermgmt --help` lists them."""
    for module in (core, play, ops, dlq, publish, recovery):
        module.register(subparsers)
