"""The driver side: run a job on Ray (`run_job`), with preflight checks, discovery of the
inputs, the scheduler that fans units out to actors, run state and progress beside it."""

from __future__ import annotations

from pipeline.driver.preflight import Prepared, preflight
from pipeline.driver.progress import RunEvent, Totals
from pipeline.driver.run import RunSummary, run_job
from pipeline.driver.scheduler import actor_name

__all__ = ["Prepared", "RunEvent", "RunSummary", "Totals", "actor_name", "preflight", "run_job"]
