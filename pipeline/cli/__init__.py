"""The `wham-batch` command line: an explicit table of commands.

Each command (pipeline/cli/*.py) names its arguments and the function it runs; heavy
libraries (torch, Ray, pyarrow's dataset layer) load when a command first needs them, so
`wham-batch --help` and light commands start quickly.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import cluster, demo, export, model, query, report, run, serve, verify
from pipeline.cli.command import Command, run_command
from pipeline.contracts.versions import version_line

#: Every command, in the order `--help` lists them.
COMMANDS: dict[str, Command] = {c.name: c for c in (
    run.RUN,
    run.VALIDATE,
    query.QUERY,
    verify.VERIFY,
    export.EXPORT,
    export.DECODE,
    report.REPORT,
    cluster.SUBMIT,
    cluster.STATUS,
    cluster.LOGS,
    cluster.STOP,
    cluster.RUNS,
    model.DREAM,
    model.CONVERT,
    model.BENCH_ENGINE,
    demo.EVAL_DEMO,
    serve.SERVE,
)}


class _VersionAction(argparse.Action):
    """`--version`, computed only when asked (it reads package metadata and git)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wham-batch",
        description="Batch rollouts of the WHAM world model on Ray, written to S3 or a folder.",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of wham-batch, torch, Ray, pyarrow, Python "
                        "and the git commit, then exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_to(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(lambda: args.func(args))

if __name__ == "__main__":
    sys.exit(main())
