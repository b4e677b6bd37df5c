"""`--verbose`: libraries' own INFO lines (Ray's job uploads, Serve's controller and proxy)
only when asked for. Their warnings and errors always show."""

from __future__ import annotations

import argparse
import logging

#: Loggers of the libraries whose INFO lines a command keeps quiet by default (Serve's own
#: logger is set when Serve starts: pipeline.serve.app.serve_logging).
LIBRARY_LOGGERS = ("ray",)


def add_verbose_argument(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help=f"also show {what} (default: their warnings and errors only)")


def library_log_level(verbose: bool) -> int:
    return logging.INFO if verbose else logging.WARNING


def quiet_libraries(*, verbose: bool) -> None:
    """Set the libraries' loggers in this process to INFO (`verbose`) or WARNING."""
    import ray  # noqa: F401 - Ray sets its loggers' levels when imported: set them after

    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_log_level(verbose))
