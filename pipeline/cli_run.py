"""`wham-batch run` and `wham-batch validate`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.spec import JobSpec


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set rollouts.steps=8 (repeatable; YAML scalar values)")


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run", help="run a job on Ray (resumes a run id that exists)",
        description="Run a batch job: plan work units, fan them out to Ray actors, write "
        "frames and Parquet tables, then the run manifest and _SUCCESS.")
    add_spec_arguments(run)
    run.add_argument("--fresh", action="store_true",
                     help="delete this run id's previous outputs first instead of resuming")
    run.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    run.set_defaults(func=cmd_run)
    validate = subparsers.add_parser(
        "validate", help="check a job YAML and print it resolved",
        description="Validate a job YAML (with overrides) and print the resolved spec, or "
        "every error with its field path.")
    add_spec_arguments(validate)
    validate.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.spec import dump_spec, load_spec

    spec = load_spec(args.config, args.overrides)
    sys.stdout.write(dump_spec(spec))
    return 0


def run_and_report(spec: JobSpec, *, fresh: bool = False, quiet: bool = False) -> int:
    """Run the driver, print the summary and where to look; exit status for the CLI."""
    from pipeline.driver import run_job
    from pipeline.logs import setup_logging

    setup_logging()
    summary = run_job(spec, fresh=fresh, progress=not quiet)
    print(summary.line())
    print(f"outputs: {summary.output_uri}  (run_date={summary.run_date}, run_id={summary.run_id})")
    shown_url = spec.public_dict()["output"]["endpoint_url"]  # no user:password@ part
    endpoint = f" --endpoint-url {shown_url}" if shown_url else ""
    print(f"try:     wham-batch query {spec.output.root} --run-id {summary.run_id}{endpoint} "
          "--table rollouts --columns rollout_id,status,generated_steps --limit 5")
    if spec.output.previews:
        print(f"previews: {summary.output_uri}/previews/run_date={summary.run_date}/"
              f"run_id={summary.run_id}/")
    if not summary.complete:
        print(f"error: {summary.units_lost} work units could not be committed; rerun the same "
              "command to resume", file=sys.stderr)
        return 1
    if not summary.ok:
        print(f"error: {summary.failed_fraction:.1%} of rollouts failed, more than "
              f"run.max_failed_fraction={spec.run.max_failed_fraction}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.spec import load_spec

    spec = load_spec(args.config, args.overrides)
    return run_and_report(spec, fresh=args.fresh, quiet=args.quiet)
