"""The `wham-batch` command line.

Each group of subcommands lives in its own module and registers itself through
`register(subparsers)`. Modules keep torch, Ray and pyarrow imports inside their command
functions, so `wham-batch --help` and light commands start quickly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import UserError
from workers.wham.errors import WHAMError

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "pipeline.cli_run",  # run, validate
    "pipeline.cli_query",  # query
    "pipeline.cli_cluster",  # submit, status, logs, stop, runs
    "pipeline.cli_model",  # dream, convert, bench-engine
    "pipeline.cli_demo",  # eval-demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wham-batch",
        description="Batch rollouts of the WHAM world model on Ray, written to S3 or a folder.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, WHAMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
