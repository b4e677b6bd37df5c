"""One `wham-batch` subcommand: its name, help, how to add its arguments and what it runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None  # long help; the module docstring where it explains more
    raw_description: bool = False  # keep the description's line breaks

    def add_to(self, subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser(
            self.name, help=self.help, description=self.description or self.help,
            formatter_class=(argparse.RawDescriptionHelpFormatter if self.raw_description
                             else argparse.HelpFormatter))
        self.add_arguments(parser)
        parser.set_defaults(func=self.run)
