"""A run you can look at: one self-contained HTML page of a run (`wham-batch report`; the
nightly job writes it beside the run's `_SUCCESS`).

`gather` reads what the page shows (status, settings, rollouts, pictures), `charts` draws the
histograms and the throughput as SVG, `page` writes the HTML, `browser` renders a page to a
PNG with headless Chromium (the docs' screenshot and the tests use it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import redact
from pipeline.contracts.spec import JobSpec
from pipeline.contracts.storage import open_storage
from pipeline.report.gather import MAX_PICTURE_BYTES, MAX_PREVIEWS, RunData, gather_run
from pipeline.report.page import render

__all__ = ["MAX_PICTURE_BYTES", "MAX_PREVIEWS", "RunData", "gather_run", "render",
           "report_beside_run", "write_report"]


def write_report(root: str, *, run_id: str, run_date: str | None = None,
                 out: str | None = None, max_previews: int = MAX_PREVIEWS,
                 max_picture_bytes: int = MAX_PICTURE_BYTES, endpoint_url: str | None = None,
                 region: str | None = None) -> tuple[str, RunData]:
    """Write the report of `run_id` to the local file `out`, or by default beside the
    run's `_SUCCESS` under `root`; (where it went, what it shows)."""
    data = gather_run(root, run_id=run_id, run_date=run_date, max_previews=max_previews,
                      max_picture_bytes=max_picture_bytes, endpoint_url=endpoint_url,
                      region=region)
    page = render(data).encode()
    if out is not None:
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(page)
        return str(path), data
    storage = open_storage(root, endpoint_url=endpoint_url, region=region)
    key = layout.report_key(data.run_date, run_id)
    storage.put_bytes(key, page, content_type="text/html; charset=utf-8")
    return storage.key_uri(key), data


def report_beside_run(spec: JobSpec) -> None:
    """Write a job's run report beside its `_SUCCESS` and say where; a report that cannot
    be written is a warning, never a change to the run's exit status."""
    try:
        where, _ = write_report(spec.output.root, run_id=spec.run.run_id,
                                run_date=spec.run.run_date.isoformat(),
                                endpoint_url=spec.output.endpoint_url,
                                region=spec.output.region)
    except (UserError, OSError) as exc:
        print(redact(f"warning: no report of run {spec.run.run_id}: {exc}"), file=sys.stderr)
        return
    print(f"report: {where}")
