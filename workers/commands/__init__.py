"""The subcommands of `usermgmt`; each module adds its parsers in `register`."""

from __future__ import annotations

import argparse

from workers.commands import core


def register_all(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every subcommand, in the order `usermgmt --help` lists them."""
    for module in (core,):
        module.register(subparsers)
