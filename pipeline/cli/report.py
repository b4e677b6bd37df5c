"""`wham-batch report`: one self-contained HTML page of a run."""

from __future__ import annotations

import argparse

from pipeline.cli.command import Command
from pipeline.report import MAX_PREVIEWS, write_report


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="output root: a local folder or s3://bucket/prefix")
    p.add_argument("--run-id", required=True, help="the run to show")
    p.add_argument("--run-date", help="its date (YYYY-MM-DD), when the id exists on several")
    p.add_argument("--out", metavar="FILE", help="a local HTML file to write (default: "
                   "report.html beside the run's _SUCCESS under ROOT)")
    p.add_argument("--max-previews", type=int, default=MAX_PREVIEWS, metavar="N",
                   help=f"rollouts shown with pictures, the worst first (default {MAX_PREVIEWS})")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS or AWS_ENDPOINT_URL_S3)")
    p.add_argument("--region", help="S3 region")


def run_report(args: argparse.Namespace) -> int:
    where, data = write_report(args.root, run_id=args.run_id, run_date=args.run_date,
                               out=args.out, max_previews=max(args.max_previews, 0),
                               endpoint_url=args.endpoint_url, region=args.region)
    print(f"wrote the report of run {data.run_id} ({data.status.get('status')}, "
          f"{len(data.rollouts)} rollouts, {len(data.tiles)} shown) to {where}")
    return 0


REPORT = Command(
    "report", "write a run's HTML report", _arguments, run_report,
    description="Write one self-contained HTML page of a run (pictures inline, no references "
    "outside the file): its status and settings, every rollout's GIF preview (or its first "
    "generated and last frames when the run kept no previews) sorted worst first by the "
    "quality signals, histograms of the signals, the failed rollouts with their errors, and "
    "generated frames per second over time.")
