"""Nightly entrypoint: `python -m jobs.nightly [--config CONFIG] [--date YYYY-MM-DD] [--set ...]`.

The date (UTC today unless given) becomes `run.run_date`, and with the shipped template
`nightly-{date}` the run id, so:

- running again for the same date resumes that night's run (committed units are skipped;
  a night whose `_SUCCESS` is there and whose outputs pass `wham-batch verify`'s check
  prints "nothing left to do" and exits 0; one that fails the check is resumed, which
  redoes the damaged units);
- a new date writes a new `run_date=` partition;
- after a run, its HTML report (`wham-batch report`) is written beside its `_SUCCESS`
  (`--no-report`: not).

The exit status is the run's: 0 when complete within the failure budget, 1 when units
could not be committed or too many rollouts failed, 2 for a bad config or environment.
Schedulers (the KubeRay CronJob in infra/, cron, Airflow) pass the date they were
scheduled for, so a run that starts late still lands in the right partition.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from pipeline.cli.command import run_command
from pipeline.cli.run import run_and_report
from pipeline.contracts.errors import UserError
from pipeline.contracts.layout import success_key
from pipeline.contracts.logs import setup_logging
from pipeline.contracts.spec import JobSpec, load_spec
from pipeline.contracts.storage import open_storage
from pipeline.driver.verify import RunCheck, verify_run
from pipeline.report import report_beside_run

DEFAULT_CONFIG = "configs/nightly.yaml"


def resolve_date(value: str | None, *, today: dt.date | None = None) -> dt.date:
    """The run date: `value` (YYYY-MM-DD) or today's date in UTC."""
    if value is None:
        return today or dt.datetime.now(dt.UTC).date()
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise UserError(f"--date {value!r}: expected a date like 2026-11-30") from None


def nightly_overrides(run_date: dt.date, overrides: list[str]) -> list[str]:
    """`overrides` with run.run_date pinned; a conflicting --set run.run_date is an error."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "run.run_date" and value.strip() != run_date.isoformat():
            raise UserError(f"--set {item}: the nightly date comes from --date "
                            f"({run_date.isoformat()}); drop the --set or pass --date")
    return [*overrides, f"run.run_date={run_date.isoformat()}"]


def already_complete(spec: JobSpec) -> RunCheck | None:
    """The check of this night's run against storage when its `_SUCCESS` marker is there
    (None when it is not): `_SUCCESS` alone is not trusted."""
    storage = open_storage(spec.output.root, endpoint_url=spec.output.endpoint_url,
                           region=spec.output.region)
    if not storage.exists(success_key(spec.run.run_date, spec.run.run_id)):
        return None
    return verify_run(storage, run_date=spec.run.run_date, run_id=spec.run.run_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"job YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--date", default=None, metavar="YYYY-MM-DD",
                        help="run date (default: today in UTC)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a field (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="no HTML report beside the run's _SUCCESS")
    args = parser.parse_args(argv)
    return run_command(lambda: _night(args))


def _night(args: argparse.Namespace) -> int:
    run_date = resolve_date(args.date)
    spec = load_spec(args.config, nightly_overrides(run_date, args.overrides))
    setup_logging()
    check = already_complete(spec)
    if check is not None and check.ok:
        print(f"run {spec.run.run_id} (run_date={run_date}) is complete and verified "
              f"({check.units_checked} units, {check.rows} rows, {check.stored_frames} "
              "stored frames): nothing left to do")
        return 0
    if check is not None:
        for line in check.lines():
            print(f"warning: {line}", file=sys.stderr)
        print(f"run {spec.run.run_id} has _SUCCESS but fails the check against storage: "
              "resuming it to redo the damaged units", file=sys.stderr, flush=True)
    print(f"nightly run {spec.run.run_id} (run_date={run_date})", flush=True)
    status = run_and_report(spec, quiet=args.quiet)
    if args.report:
        report_beside_run(spec)
    return status


if __name__ == "__main__":
    sys.exit(main())
