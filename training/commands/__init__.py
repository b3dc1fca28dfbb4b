"""One module per `doc2atom` subcommand (or group): each `add_parser(subparsers)` registers its arguments and
sets its handler. Handlers import their heavy modules themselves, so `doc2atom --help` stays fast."""

from __future__ import annotations

import argparse

from . import bank, checkpoint, compile, data, demo, eval, models, router, train

COMMANDS = (models, bank, checkpoint, data, train, compile, eval, router, demo)  # in `doc2atom --help` order


def add_all(subparsers: argparse._SubParsersAction) -> None:
    """Register every subcommand."""
    for command in COMMANDS:
        command.add_parser(subparsers)
