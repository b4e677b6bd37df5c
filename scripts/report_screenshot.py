"""Write docs/report.png: the demo job's run report, as headless Chromium shows it.

    python scripts/report_screenshot.py [--out docs/report.png] [--height 1400]

Runs configs/demo.yaml (on a private local Ray, as `make demo` does) into a temporary output
root, writes the run's page with the code behind `wham-batch report`, and renders the page
with Chromium (`pipeline.report.browser`). Needs the Debian package `chromium`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from pipeline.contracts.spec import load_spec
from pipeline.driver import run_job
from pipeline.report import write_report
from pipeline.report.browser import screenshot
from workers.actor.actor import RolloutActor

REPO = Path(__file__).resolve().parents[1]
#: A fixed date, so the page shows the same run id whenever the script runs.
RUN_DATE = "2026-12-01"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wham-report-"))
    try:
        spec = load_spec(REPO / "configs" / "demo.yaml",
                         [f"output.root={work / 'out'}", f"run.run_date={RUN_DATE}"])
        summary = run_job(spec, actor_cls=RolloutActor, progress=False)
        if not summary.complete:
            raise SystemExit(f"the demo run did not complete: {summary}")
        page, data = write_report(str(work / "out"), run_id=spec.run.run_id,
                                  out=str(work / "report.html"))
        screenshot(Path(page), args.out, width=args.width, height=args.height)
        print(f"wrote {args.out}: the report of run {data.run_id} ({len(data.tiles)} "
              f"rollouts shown)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
