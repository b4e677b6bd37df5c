"""`wham-batch verify ROOT --run-id ID`: check a run's outputs against its commit markers.

The same check the driver runs before `_SUCCESS`: every object a unit's marker vouches for
holds the bytes it records (size and SHA-256: by the checksum S3 keeps beside the object,
without downloading it, or by hashing it where the store keeps none, as a local folder;
`--deep` reads and hashes every byte everywhere), every part says it is that unit's part of
that run and plan and holds the rows its marker records, every frame a row names exists,
every marker can be trusted and comes from one plan, and as many units are committed as the
manifest planned. Units written before schema version 3 have no checksums in their markers:
they are checked by counts, and the output says how many. Exit 0 when all of that holds, 1
with the list of problems otherwise (2 for a bad root or run id), so a dataset one did not
write can be audited before use.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from pipeline.cli.command import Command
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import Storage, open_storage
from pipeline.driver.run_state import read_runs
from pipeline.driver.verify import RunCheck, verify_run

EXIT_PROBLEMS = 1


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="output root: a local folder or s3://bucket/prefix")
    p.add_argument("--run-id", required=True, help="the run to check")
    p.add_argument("--run-date", default=None,
                   help="its run date (YYYY-MM-DD); needed only when the id has several")
    p.add_argument("--deep", action="store_true",
                   help="read and hash every object, even where S3 keeps its checksum")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS or AWS_ENDPOINT_URL_S3)")
    p.add_argument("--region", help="S3 region")


def _run_date(storage: Storage, run_id: str, given: str | None) -> str:
    if given is not None:
        return given
    dates = sorted({r["run_date"] for r in read_runs(storage) if r["run_id"] == run_id})
    if not dates:
        raise UserError(f"no run {run_id} under {storage.uri} (`wham-batch runs "
                        f"{storage.uri}` lists the runs there)")
    if len(dates) > 1:
        raise UserError(f"run {run_id} exists for several dates ({', '.join(dates)}): "
                        "pass --run-date")
    return dates[0]


def _how(check: RunCheck) -> str:
    how = " (every object read and hashed)" if check.deep else ""
    if check.units_by_counts:
        how += (f"; {check.units_by_counts} units written before schema version 3 were "
                "checked by counts only (their markers record no checksums)")
    return how


def cmd_verify(args: argparse.Namespace) -> int:
    storage = open_storage(args.root, endpoint_url=args.endpoint_url, region=args.region)
    run_date = _run_date(storage, args.run_id, args.run_date)
    check = verify_run(storage, run_date=run_date, run_id=args.run_id, deep=args.deep)
    if args.json:
        print(json.dumps({**asdict(check), "ok": check.ok}))
    elif check.ok:
        print(f"run {args.run_id} ({run_date}) ok: {check.units_checked} units, {check.rows} "
              f"steps rows and {check.stored_frames} stored frames checked against "
              f"{storage.uri}{_how(check)}")
    else:
        print(f"run {args.run_id} ({run_date}): {len(check.lines())} problem(s) in "
              f"{storage.uri}:", file=sys.stderr)
        for line in check.lines():
            print(f"  {line}", file=sys.stderr)
        print("a rerun of the same job redoes the units named here", file=sys.stderr)
    return 0 if check.ok else EXIT_PROBLEMS


VERIFY = Command(
    "verify", "check a run's outputs against its commit markers", _arguments, cmd_verify,
    description=__doc__.split("\n\n", 1)[1])
