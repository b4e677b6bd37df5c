"""`wham-batch submit | status | logs | stop | runs`: jobs on a Ray cluster and their runs."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from typing import Any

from pipeline import submit as sub
from pipeline.cli.command import Command
from pipeline.cli.run import add_spec_arguments
from pipeline.cli.verbosity import add_verbose_argument, quiet_libraries
from pipeline.contracts.secrets import redact
from pipeline.driver.run_state import list_runs

DEFAULT_TIMEOUT_S = 6 * 3600.0
EXIT_JOB_FAILED = 1
EXIT_TIMEOUT = 124
_LOG_TAIL_LINES = 40


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, metavar="URL",
        help="Ray dashboard / Jobs API address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS). "
        "For token auth set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH).")


def _submit_arguments(submit: argparse.ArgumentParser) -> None:
    add_spec_arguments(submit)
    _add_address(submit)
    code = submit.add_mutually_exclusive_group()
    code.add_argument("--working-dir", default=None, metavar="DIR",
                      help="project folder to upload with the job (default: the wham-batch "
                      "project containing the current directory)")
    code.add_argument("--image-has-package", action="store_true",
                      help="the cluster's image has wham-batch installed: upload only the config")
    submit.add_argument("--absolute-paths", action="store_true",
                        help="send relative paths of the spec as this machine's absolute paths "
                        "(for a cluster that shares this machine's files, e.g. a head started "
                        "here); without it a relative output.root is refused")
    submit.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="extra non-secret environment variable for the job (repeatable)")
    submit.add_argument("--submission-id", default=None, help="job id to use (default: Ray's)")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the job to finish; exit 1 if it fails")
    submit.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it finishes (implies --wait)")
    submit.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help="give up waiting after S seconds (exit 124; the job keeps running)")
    add_verbose_argument(submit, what="Ray's INFO lines (packaging and uploading the code; "
                         "with --follow, the cluster's job set-up)")


def _status_arguments(status: argparse.ArgumentParser) -> None:
    status.add_argument("job_id", nargs="?", help="submission id (omit to list jobs)")
    _add_address(status)
    status.add_argument("--json", action="store_true",
                        help="print JSON Lines (one JSON object per job, one per line)")


def _logs_arguments(logs: argparse.ArgumentParser) -> None:
    logs.add_argument("job_id", help="submission id")
    _add_address(logs)
    logs.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    logs.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                      help="stop following after S seconds")


def _stop_arguments(stop: argparse.ArgumentParser) -> None:
    stop.add_argument("job_id", help="submission id")
    _add_address(stop)
    stop.add_argument("--wait", action="store_true", help="wait until it has stopped")
    stop.add_argument("--timeout", type=float, default=60.0, metavar="S",
                      help="how long --wait waits")


def _runs_arguments(runs: argparse.ArgumentParser) -> None:
    runs.add_argument("root", help="output root: a folder or s3://bucket/prefix")
    runs.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS or env)")
    runs.add_argument("--region", default=None, help="S3 region")
    runs.add_argument("--run-date", default=None, help="only runs of this date (YYYY-MM-DD)")
    runs.add_argument("--json", action="store_true",
                      help="print JSON Lines (one JSON object per run, one per line)")


# ---------------------------------------------------------------- jobs


def _print_failure_tail(client: Any, job_id: str) -> None:
    try:
        info = client.get_job_info(job_id)
        lines = client.get_job_logs(job_id).splitlines()[-_LOG_TAIL_LINES:]
    except Exception as exc:  # the failure itself is already reported; logs are a bonus
        print(f"(could not fetch logs: {exc})", file=sys.stderr)
        return
    if info.message:
        print(redact(f"cluster says: {info.message}"), file=sys.stderr)  # holds a log tail
    if lines:
        print(f"last {len(lines)} log lines:", file=sys.stderr)
        print(redact("\n".join(f"  {line}" for line in lines)), file=sys.stderr)


def job_exit_status(status: str) -> int:
    """One rule for `submit --wait`, `status JOB_ID` and `stop --wait`: 0 unless the job
    FAILED or was STOPPED (a run's own exit status decides whether its job FAILED)."""
    return EXIT_JOB_FAILED if status in ("FAILED", "STOPPED") else 0


def _finish(client: Any, job_id: str, status: str | None, timeout_s: float, *,
            submission: sub.Submission) -> int:
    if status is None:
        print(f"job {job_id} still running after {timeout_s:g}s; it keeps running on the "
              f"cluster (`wham-batch stop {job_id}` stops it)", file=sys.stderr)
        return EXIT_TIMEOUT
    print(f"job {job_id} {status}")
    if status != "SUCCEEDED":
        _print_failure_tail(client, job_id)
        return EXIT_JOB_FAILED
    root = shlex.quote(submission.output_root)
    print(f"outputs: {submission.output_root}  (run_id={submission.run_id})")
    print(f"try:     wham-batch runs {root}\n"
          f"         wham-batch query {root} --run-id {submission.run_id} --table rollouts "
          "--limit 5")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    quiet_libraries(verbose=args.verbose)
    # Validation and packaging happen before any connection: a bad spec never reaches
    # the cluster.
    submission = sub.build_submission(
        args.config, overrides=args.overrides, working_dir=args.working_dir,
        image_has_package=args.image_has_package, env=args.env,
        absolute_paths=args.absolute_paths)
    print(f"spec ok: run {submission.run_id}, outputs to {submission.output_root}",
          file=sys.stderr)
    try:
        client = sub.connect(args.address)
        job_id = sub.submit(client, submission, submission_id=args.submission_id)
    finally:
        submission.remove_staging()
    print(job_id)
    print(f"submitted {job_id} to {client.get_address()}: {submission.entrypoint}",
          file=sys.stderr)
    if not (args.wait or args.follow):
        return 0
    started = time.monotonic()
    if args.follow and not sub.follow_logs(client, job_id, timeout_s=args.timeout,
                                           ray_info=args.verbose):
        return _finish(client, job_id, None, args.timeout, submission=submission)
    remaining = max(args.timeout - (time.monotonic() - started), 1.0)
    status = sub.wait_for_job(
        client, job_id, timeout_s=remaining,
        on_change=lambda s: print(f"job {job_id}: {s}", file=sys.stderr))
    return _finish(client, job_id, status, args.timeout, submission=submission)


def cmd_status(args: argparse.Namespace) -> int:
    client = sub.connect(args.address)
    with sub.cluster_errors(client.get_address()):
        if args.job_id is None:
            jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
            rows = [_job_row(job) for job in jobs]
        else:
            sub.job_status(client, args.job_id)  # UserError for an unknown id
            rows = [_job_row(client.get_job_info(args.job_id))]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif args.job_id is None:
        for row in rows:
            print(f"{row['job_id'] or '-':<28} {row['status']:<10} {row['entrypoint']}")
    else:
        for key, value in rows[0].items():
            print(f"{key:<11} {value}")
    return job_exit_status(rows[0]["status"]) if args.job_id is not None else 0


def _job_row(info: Any) -> dict[str, Any]:
    def when(ms: int | None) -> str | None:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None

    return {
        "job_id": info.submission_id,
        "status": str(info.status.value),
        "message": redact(info.message) if info.message else info.message,
        "entrypoint": info.entrypoint,
        "start_time": when(info.start_time),
        "end_time": when(info.end_time),
        "metadata": dict(info.metadata or {}),
    }


def cmd_logs(args: argparse.Namespace) -> int:
    client = sub.connect(args.address)
    sub.job_status(client, args.job_id)  # UserError for an unknown id
    if args.follow:
        return 0 if sub.follow_logs(client, args.job_id, timeout_s=args.timeout) else EXIT_TIMEOUT
    with sub.cluster_errors(client.get_address()):
        sys.stdout.write(redact(client.get_job_logs(args.job_id)))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = sub.connect(args.address)
    status = sub.job_status(client, args.job_id)
    if status in sub.TERMINAL_STATUSES:
        print(f"job {args.job_id} already {status}")
        return 0
    with sub.cluster_errors(client.get_address()):
        client.stop_job(args.job_id)
    print(f"stop requested for {args.job_id}")
    if args.wait:
        final = sub.wait_for_job(client, args.job_id, timeout_s=args.timeout)
        if final is None:
            print(f"job {args.job_id} has not stopped after {args.timeout:g}s", file=sys.stderr)
            return EXIT_TIMEOUT
        print(f"job {args.job_id} {final}")
    return 0  # stopping is what was asked for


# ---------------------------------------------------------------- runs


def cmd_runs(args: argparse.Namespace) -> int:
    runs = list_runs(args.root, endpoint_url=args.endpoint_url, region=args.region,
                     run_date=args.run_date)
    if args.json:
        for run in runs:
            print(json.dumps(asdict(run)))
        return 0
    if not runs:
        print(f"no runs under {args.root}", file=sys.stderr)
        return 0
    header = (f"{'RUN_DATE':<10}  {'RUN_ID':<28} {'STATUS':<8} {'UNITS':>9} {'OK':>7} "
              f"{'FAILED':>6} {'GENERATED':>9} {'STORED':>8} {'FRAMES/S':>9}")
    print(header)
    for r in runs:
        units = f"{r.units_committed}/{r.units_planned if r.units_planned is not None else '?'}"
        fps = f"{r.frames_per_second:.1f}" if r.frames_per_second is not None else "-"
        generated = r.generated_frames if r.generated_frames is not None else "?"
        print(f"{r.run_date:<10}  {r.run_id:<28} {r.status:<8} {units:>9} {r.rollouts_ok:>7} "
              f"{r.rollouts_failed:>6} {generated:>9} {r.stored_frames:>8} {fps:>9}")
    return 0


SUBMIT = Command(
    "submit", "validate a job YAML and submit it to a Ray cluster", _submit_arguments,
    cmd_submit,
    description="Validate the job YAML locally, then submit `python -m jobs.run CONFIG` to a "
    "Ray cluster through the Jobs API and print the job id. Credentials are never sent with "
    "the job: the cluster uses its own environment or role.")
STATUS = Command("status", "status of a job (or list jobs)", _status_arguments, cmd_status,
                 description="Show one job's status, or all jobs without an id. With an id the "
                 "exit status is 1 for a FAILED or STOPPED job, as with `submit --wait`.")
LOGS = Command("logs", "print a job's logs", _logs_arguments, cmd_logs,
               description="Print a job's driver logs.")
STOP = Command("stop", "stop a running job", _stop_arguments, cmd_stop,
               description="Ask the cluster to stop a job.")
RUNS = Command(
    "runs", "list the runs under an output root with their status", _runs_arguments, cmd_runs,
    description="List runs under ROOT/_runs: running (a driver holds its lease), complete (has "
    "_SUCCESS: every unit committed and failed rollouts within run.max_failed_fraction, the "
    "runs that exited 0), failed (every unit committed, too many failed rollouts) or partial, "
    "with committed/planned units, rollouts, generated frames (ok rollouts x rollouts.steps), "
    "stored frames (context included) and the frames per second of the run's own attempts. "
    "--json prints JSON Lines: one object per run.")
