"""One `wham-batch` subcommand (its name, help, arguments and what it runs), and how every
command stops on SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import redact
from workers.wham.errors import WHAMError


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


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwind like Ctrl-C (Ray actors are stopped, waits end)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def stop_on_sigterm() -> None:
    """Make SIGTERM end a waiting command the way Ctrl-C does (exit status 143)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def failure_status(exc: OSError) -> int:
    """Print a storage or network failure that outlasted its retries (no traceback, no
    credentials); exit status 2, like any other problem of the environment."""
    print(redact(f"error: storage or network failure: {exc}"), file=sys.stderr)
    print("nothing is lost: what was committed stays, and the same command resumes",
          file=sys.stderr)
    return 2


def interrupted_status(exc: KeyboardInterrupt) -> int:
    """Print why the command stopped; its exit status (143 for SIGTERM, 130 for Ctrl-C)."""
    if isinstance(exc, Terminated):
        print("stopped (SIGTERM)", file=sys.stderr)
        return 143
    print("interrupted", file=sys.stderr)
    return 130


def run_command(body: Callable[[], int | None]) -> int:
    """Run an entry point's work: SIGTERM stops it like Ctrl-C (130 / 143); a user, model,
    storage or network error prints one message, no traceback, and exits 2."""
    stop_on_sigterm()
    try:
        return int(body() or 0)
    except (UserError, WHAMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        return failure_status(exc)
    except KeyboardInterrupt as exc:
        return interrupted_status(exc)
