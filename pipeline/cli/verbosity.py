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
    """Let the libraries' loggers in this process pass INFO (`verbose`) or WARNING and up.

    The handlers get the level too: some of Ray's modules set their own loggers to INFO
    when they are imported (its job client does), and their lines go out through the
    handler Ray puts on its top logger."""
    import ray  # noqa: F401 - Ray sets up its loggers when imported: set them after

    level = library_log_level(verbose)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in logger.handlers:
            handler.setLevel(level)
