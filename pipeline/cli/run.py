"""`wham-batch run` and `wham-batch validate`."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.command import Command
from pipeline.driver import run_job
from pipeline.logs import setup_logging
from pipeline.spec import JobSpec, dump_spec, load_spec
from workers.actor import RolloutActor


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set rollouts.steps=8 (repeatable; YAML scalar values)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser)
    parser.add_argument("--fresh", action="store_true",
                        help="delete this run id's previous outputs first instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.overrides)
    sys.stdout.write(dump_spec(spec))
    return 0


def run_and_report(spec: JobSpec, *, fresh: bool = False, quiet: bool = False) -> int:
    """Run the driver, print the summary and where to look; exit status for the CLI."""
    setup_logging()
    summary = run_job(spec, actor_cls=RolloutActor, fresh=fresh, progress=not quiet)
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
    spec = load_spec(args.config, args.overrides)
    return run_and_report(spec, fresh=args.fresh, quiet=args.quiet)


RUN = Command(
    "run", "run a job on Ray (resumes a run id that exists)", _run_arguments, cmd_run,
    description="Run a batch job: plan work units, fan them out to Ray actors, write frames "
    "and Parquet tables, then the run manifest and _SUCCESS.")
VALIDATE = Command(
    "validate", "check a job YAML and print it resolved", add_spec_arguments, cmd_validate,
    description="Validate a job YAML (with overrides) and print the resolved spec, or every "
    "error with its field path.")
