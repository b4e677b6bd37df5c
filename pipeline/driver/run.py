"""The Ray driver: check, plan, fan work units out to actors, collect receipts, commit the run.

Only small descriptors go out (units of rollout ids and seed URIs) and only receipts come
back; frames go from the actors straight to storage. `run_job` tells the story; preflight,
the scheduler and the run state are the machinery beside it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import layout
from pipeline.driver.preflight import Prepared, check_cluster, connect_ray, preflight
from pipeline.driver.progress import EventHook, Progress, Totals
from pipeline.driver.run_state import (
    delete_run,
    manifest_bytes,
    marker_totals,
    read_json,
    run_fingerprint,
)
from pipeline.driver.scheduler import Scheduler
from pipeline.errors import UserError
from pipeline.logs import set_log_context
from pipeline.plan import WorkUnit, committed_unit_ids, pending_units, plan_for_spec
from pipeline.spec import JobSpec

log = logging.getLogger("pipeline.driver")


@dataclass(slots=True)
class RunSummary:
    run_id: str
    run_date: str
    output_uri: str
    complete: bool
    units_total: int
    units_skipped: int
    units_lost: int
    rollouts_ok: int
    rollouts_failed: int
    frames: int
    wall_seconds: float
    frames_per_second: float
    max_failed_fraction: float
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_fraction(self) -> float:
        done = self.rollouts_ok + self.rollouts_failed
        return self.rollouts_failed / done if done else 0.0

    @property
    def ok(self) -> bool:
        return self.complete and self.failed_fraction <= self.max_failed_fraction

    def line(self) -> str:
        status = "complete" if self.complete else f"INCOMPLETE ({self.units_lost} units lost)"
        return (f"run {self.run_id} {status}: {self.rollouts_ok} rollouts ok, "
                f"{self.rollouts_failed} failed, {self.frames} frames in "
                f"{self.wall_seconds:.1f}s ({self.frames_per_second:.1f} frames/s)")


@dataclass
class _Run:
    """One attempt at a run: its identity, plan and counters, and how to record them."""

    spec: JobSpec
    prep: Prepared
    units: list[WorkUnit]
    fingerprint: str
    totals: Totals
    model_info: dict[str, Any]
    started_at: float  # wall clock (time.time) when the attempt began
    t0: float  # time.monotonic at the same moment

    @property
    def run_date(self) -> str:
        return self.spec.run.run_date.isoformat()

    @property
    def run_id(self) -> str:
        return self.spec.run.run_id

    def write_manifest(self, status: str) -> None:
        body = manifest_bytes(self.spec, status=status, fingerprint=self.fingerprint,
                              totals=self.totals, model=self.model_info,
                              started_at=self.started_at, wall=time.monotonic() - self.t0)
        self.prep.storage.put_bytes(layout.manifest_key(self.run_date, self.run_id), body,
                                    content_type="application/json")


def run_job(spec: JobSpec, *, actor_cls: type, fresh: bool = False, progress: bool = True,
            on_event: EventHook | None = None) -> RunSummary:
    """Run a job to completion (or resume it) with actors of `actor_cls`; its summary.

    Raises UserError for anything found before actors start (bad model source, unwritable
    output, no seeds, a changed plan, not enough cluster resources). Lost units are retried
    up to `resources.max_unit_attempts`; a run that still misses units returns
    complete=False.
    """
    clock = (time.time(), time.monotonic())
    prep = preflight(spec)
    set_log_context(run_id=spec.run.run_id)
    if fresh:
        _discard_earlier_outputs(spec, prep)
    run, todo = _plan(spec, prep, clock=clock)
    prog = Progress(run_id=run.run_id, totals=run.totals, show=progress,
                    hooks=[on_event] if on_event else [])
    log.info("run %s: %d units (%d already committed), %d rollouts, output %s", run.run_id,
             len(run.units), run.totals.units_skipped, run.totals.rollouts_total,
             prep.storage.uri)
    if todo:
        _generate(run, todo, actor_cls=actor_cls, prog=prog)
    summary = _commit(run)
    prog.emit("finished", detail=summary.line())
    log.info(summary.line())
    return summary


def _discard_earlier_outputs(spec: JobSpec, prep: Prepared) -> None:
    removed = delete_run(prep.storage, run_date=spec.run.run_date.isoformat(),
                         run_id=spec.run.run_id)
    log.info("--fresh: removed %d objects of run %s", removed, spec.run.run_id)


def _plan(spec: JobSpec, prep: Prepared, *,
          clock: tuple[float, float]) -> tuple[_Run, list[WorkUnit]]:
    """The run's units, checked against an earlier attempt's plan, and those still to do."""
    run_date, run_id = spec.run.run_date.isoformat(), spec.run.run_id
    units = plan_for_spec(spec, prep.seeds)
    fingerprint = run_fingerprint(spec, units)
    manifest_key = layout.manifest_key(run_date, run_id)
    previous = read_json(prep.storage, manifest_key)
    if previous:
        layout.check_schema_version(previous.get("schema_version", layout.SCHEMA_VERSION),
                                    where=f"{prep.storage.key_uri(manifest_key)}")
    if previous and previous.get("plan_fingerprint") not in (None, fingerprint):
        raise UserError(f"run {run_id} already has outputs from a different plan (other "
                        "seeds, model or rollout settings); pass --fresh to replace them or use "
                        "a new run.run_id")
    committed = committed_unit_ids(prep.storage, run_date=run_date, run_id=run_id)
    todo = pending_units(units, committed)
    totals = Totals(rollouts_total=sum(u.num_rollouts for u in units), units_total=len(units),
                    units_skipped=len(units) - len(todo))
    done = marker_totals(prep.storage, run_date=run_date, run_id=run_id,
                         unit_ids=[u.unit_id for u in units if u.unit_id in committed])
    totals.rollouts_ok, totals.rollouts_failed = done.ok, done.failed
    totals.frames = done.ok * spec.rollouts.steps  # generated frames, as in receipts
    run = _Run(spec=spec, prep=prep, units=units, fingerprint=fingerprint, totals=totals,
               model_info=previous.get("model", {}) if previous else {},
               started_at=clock[0], t0=clock[1])
    return run, todo


def _generate(run: _Run, todo: list[WorkUnit], *, actor_cls: type, prog: Progress) -> None:
    """Start Ray if needed, fan the units out, and record what the actors report."""
    import ray

    started_ray = connect_ray()
    try:
        check_cluster(run.spec)
        run.write_manifest("running")
        prog.start()
        scheduler = Scheduler(run.spec, todo, actor_cls=actor_cls, prog=prog,
                              script=run.prep.script)
        run.model_info.update(scheduler.run())
    finally:
        prog.close()
        if started_ray:
            ray.shutdown()


def _commit(run: _Run) -> RunSummary:
    """Write the final manifest, and _SUCCESS when every unit is committed."""
    totals = run.totals
    wall = time.monotonic() - run.t0
    complete = totals.units_lost == 0
    run.write_manifest("complete" if complete else "incomplete")
    if complete:
        run.prep.storage.put_bytes(layout.success_key(run.run_date, run.run_id), b"",
                                   content_type="text/plain")
    return RunSummary(
        run_id=run.run_id, run_date=run.run_date, output_uri=run.prep.storage.uri,
        complete=complete, units_total=len(run.units), units_skipped=totals.units_skipped,
        units_lost=totals.units_lost, rollouts_ok=totals.rollouts_ok,
        rollouts_failed=totals.rollouts_failed, frames=totals.frames, wall_seconds=wall,
        frames_per_second=totals.frames / wall if wall > 0 else 0.0,
        max_failed_fraction=run.spec.run.max_failed_fraction, model=run.model_info)
