"""`wham-batch run` and `wham-batch validate`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from pipeline.cli.command import Command
from pipeline.contracts.errors import UserError
from pipeline.contracts.logs import setup_logging
from pipeline.contracts.spec import JobSpec, dump_spec, load_spec
from pipeline.contracts.spec.load import spec_schema
from pipeline.contracts.spec.paths import is_uri, missing_local_paths, remote_paths
from pipeline.driver import RunSummary, run_job
from pipeline.driver.preflight import (
    CONNECT_TIMEOUT_S,
    check_model_source,
    check_seed_sample,
    find_seeds,
    load_script,
)
from workers.actor.actor import RolloutActor
from workers.actor.inputs import check_seed
from workers.actor.ray_hooks import install_ray_hooks

EXIT_RUN_NOT_OK = 1


def add_spec_arguments(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    parser.add_argument("config", nargs="?" if optional else None,
                        help="job YAML (see configs/); relative paths in it are relative to "
                        "its folder")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set rollouts.steps=8 (repeatable; YAML scalar values; "
        "a relative path is relative to the current folder)")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, metavar="HOST:PORT",
        help="run on this Ray cluster: its GCS address (HEAD:6379) or ray://HEAD:10001 "
        "(default: $RAY_ADDRESS; without either, a private local Ray instance)")
    parser.add_argument(
        "--connect-timeout", type=float, default=CONNECT_TIMEOUT_S, metavar="S",
        help=f"give up when the cluster does not answer within S seconds "
        f"(default {CONNECT_TIMEOUT_S:g})")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser)
    add_ray_arguments(parser)
    parser.add_argument("--fresh", action="store_true",
                        help="delete this run id's previous outputs first instead of resuming")
    parser.add_argument("--quiet", action="store_true",
                        help="only warnings and errors on stderr (no progress); the summary "
                        "is still printed")


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, optional=True)
    parser.add_argument("--schema", action="store_true",
                        help="print the JSON Schema of a job YAML instead (no CONFIG needed)")
    parser.add_argument("--no-path-check", action="store_true",
                        help="only validate the fields: do not check local paths, the model "
                        "endpoint, the action script or the seeds (e.g. paths that only the "
                        "cluster's nodes have)")


def cmd_validate(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(spec_schema(), indent=2))
        return 0
    if not args.config:
        raise UserError("validate needs a job YAML (or --schema)")
    spec = load_spec(args.config, args.overrides)
    sys.stdout.write(dump_spec(spec))
    if args.no_path_check:
        return 0
    missing = missing_local_paths(spec)
    if missing:
        raise UserError(f"{args.config}: the spec is valid but its paths are not:\n  "
                        + "\n  ".join(missing))
    check_inputs(spec)
    remote = remote_paths(spec)
    if remote:
        print(f"note: {', '.join(remote)} not checked (s3://); `wham-batch run` checks them "
              "before any actor starts", file=sys.stderr)
    return 0


def check_inputs(spec: JobSpec) -> None:
    """What `run` checks before any actor starts, on what validate reaches without the
    cluster: the model endpoint answers, a local action script covers rollouts.steps, and a
    sample of local seeds reads and decodes."""
    if spec.model.endpoint is not None:
        check_model_source(spec)
    if spec.rollouts.actions.kind == "file" and not is_uri(spec.rollouts.actions.path):
        load_script(spec)
    if not is_uri(spec.seeds.source):  # a local manifest may still list s3:// seeds
        local = [ref for ref in find_seeds(spec) if not is_uri(ref.uri)]
        if local:
            check_seed_sample(spec, local, check_seed=check_seed)


def shown_location(root: str) -> str:
    """An output root as the user should type it here: a URI as it is, a local folder
    relative to the current one when inside it, else absolute."""
    if is_uri(root):
        return root
    path = Path(root).absolute()
    try:
        return str(path.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path)


def print_summary(spec: JobSpec, summary: RunSummary, *, hints: bool = True) -> int:
    """The summary, where the outputs are and what to try; the exit status of the run."""
    print(summary.line())
    root = shown_location(spec.output.root)
    print(f"outputs: {root}  (run_date={summary.run_date}, run_id={summary.run_id})")
    if hints:
        shown_url = spec.public_dict()["output"]["endpoint_url"]  # no user:password@ part
        endpoint = f" --endpoint-url {shown_url}" if shown_url else ""
        print(f"try:     wham-batch query {shlex.quote(root)} --run-id {summary.run_id}"
              f"{endpoint} --table rollouts --columns rollout_id,status,generated_steps "
              "--limit 5")
        if spec.output.previews:
            print(f"previews: {root}/previews/run_date={summary.run_date}/"
                  f"run_id={summary.run_id}/")
    if summary.status == "incomplete":
        print(f"error: {summary.units_lost} work units could not be committed; rerun the same "
              "command to resume", file=sys.stderr)
    elif summary.status == "failed":
        print(f"error: {summary.failed_fraction:.1%} of rollouts failed, more than "
              f"run.max_failed_fraction={spec.run.max_failed_fraction:g}; their errors are in "
              "the rollouts table (status failed) and the warnings above. Every unit is "
              "committed, so a rerun finds nothing to do: fix the cause and pass --fresh",
              file=sys.stderr)
    return 0 if summary.ok else EXIT_RUN_NOT_OK


def run_and_report(spec: JobSpec, *, fresh: bool = False, quiet: bool = False,
                   address: str | None = None,
                   connect_timeout_s: float = CONNECT_TIMEOUT_S) -> int:
    """Run the driver, print the summary and where to look; exit status for the CLI."""
    level = "WARNING" if quiet else None
    setup_logging(level=level)
    install_ray_hooks()  # the driver's own metrics (units in flight, committed) go to Ray
    summary = run_job(spec, actor_cls=RolloutActor, fresh=fresh, progress=not quiet,
                      ray_address=address, connect_timeout_s=connect_timeout_s,
                      actor_log_level=level, check_seed=check_seed)
    return print_summary(spec, summary, hints=not quiet)


def cmd_run(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.overrides)
    return run_and_report(spec, fresh=args.fresh, quiet=args.quiet, address=args.address,
                          connect_timeout_s=args.connect_timeout)


RUN = Command(
    "run", "run a job on Ray (resumes a run id that exists)", _run_arguments, cmd_run,
    description="Run a batch job: plan work units, fan them out to Ray actors, write frames "
    "and Parquet tables, then the run manifest and _SUCCESS. Ray: the cluster named by "
    "--address or RAY_ADDRESS, else a private local instance started for this run. Exit "
    "status: 0 when every unit is committed and failed rollouts stay within "
    "run.max_failed_fraction, 1 otherwise, 2 for a bad config or environment.")
VALIDATE = Command(
    "validate", "check a job YAML and print it resolved", _validate_arguments, cmd_validate,
    description="Validate a job YAML (with overrides) and print the resolved spec, or every "
    "error with its field path; then check what `run` checks before any actor starts, on "
    "what is reachable from here: local paths exist, the model endpoint answers, a local "
    "action script covers rollouts.steps, a sample of local seeds decodes (exit 2 if not; "
    "--no-path-check skips these). --schema prints the JSON Schema of a job YAML.")
