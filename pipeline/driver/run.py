"""The Ray driver: check, plan, fan work units out to actors, collect receipts, commit the run.

Only small descriptors go out (units of rollout ids and seed URIs) and only receipts come
back; frames go from the actors straight to storage. `run_job` tells the story; preflight,
the scheduler and the run state are the machinery beside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.logs import set_log_context
from pipeline.contracts.plan import WorkUnit, check_plan_size, pending_units, plan_for_spec
from pipeline.contracts.spec import JobSpec
from pipeline.driver.lease import RunLease
from pipeline.driver.preflight import (
    CONNECT_TIMEOUT_S,
    Prepared,
    SeedCheck,
    check_cluster,
    cluster_address,
    connect_ray,
    preflight,
)
from pipeline.driver.progress import EventHook, Progress, StatusLine, Totals
from pipeline.driver.run_state import (
    Throughput,
    delete_run,
    manifest_bytes,
    read_json,
    read_markers,
    reopen_retryable_units,
    retryable_units,
    run_fingerprint,
    totals_of,
)
from pipeline.driver.scheduler import MODEL_FACTS, Scheduler
from pipeline.driver.summary import RunSummary, counted
from pipeline.driver.verify import check_units

log = logging.getLogger("pipeline.driver")
#: Rounds of generate-then-verify in one attempt: units that fail verification are redone
#: once more here; what still fails is left uncommitted for the next rerun.
VERIFY_ROUNDS = 2


@dataclass(slots=True)
class RunPlan:
    """The run's units and what storage holds of them, as planning found it (planning only
    reads): trusted markers of planned units, markers that cannot be trusted, and the
    committed units a rerun may complete (their rollouts failed retryably)."""

    units: list[WorkUnit]
    fingerprint: str
    seed_scope: str  # what the units' rng seeds mix in (run.seed_scope, or an old run's)
    previous: dict[str, Any]  # the earlier attempt's manifest ({} when none)
    committed: dict[str, dict[str, Any]]  # unit id -> trusted marker
    untrusted: dict[str, str]  # unit id -> why its marker cannot be trusted
    reopen: set[str]  # committed units to run again

    @property
    def kept(self) -> dict[str, dict[str, Any]]:
        """The committed units that stay committed, with their markers."""
        return {uid: m for uid, m in self.committed.items() if uid not in self.reopen}

    def todo(self) -> list[WorkUnit]:
        kept = self.kept
        return [replace(u, plan_fingerprint=self.fingerprint)
                for u in pending_units(self.units, set(kept))]


@dataclass
class _Run:
    """One attempt at a run: its identity, plan and counters, and how to record them."""

    spec: JobSpec
    prep: Prepared
    plan: RunPlan
    totals: Totals
    model_info: dict[str, Any]
    started_at: float  # wall clock (time.time) when the attempt began
    t0: float  # time.monotonic at the same moment
    lease: RunLease
    before: Totals = field(init=False)  # the counts earlier attempts left
    throughput: Throughput = field(init=False)  # what earlier attempts generated, and when
    units_redone: int = 0
    problems: list[str] = field(default_factory=list)
    verified: dict[str, dict[str, Any]] = field(default_factory=dict)  # unit id -> marker

    def __post_init__(self) -> None:
        self.before = replace(self.totals)
        self.throughput = Throughput.of_manifest(self.plan.previous)

    @property
    def units(self) -> list[WorkUnit]:
        return self.plan.units

    @property
    def fingerprint(self) -> str:
        return self.plan.fingerprint

    @classmethod
    def begin(cls, spec: JobSpec, prep: Prepared, plan: RunPlan, *, clock: tuple[float, float],
              lease: RunLease, problems: list[str]) -> _Run:
        """The attempt, its counts starting from what earlier attempts committed."""
        kept = plan.kept
        totals = Totals(rollouts_total=sum(u.num_rollouts for u in plan.units),
                        units_total=len(plan.units), units_skipped=len(kept))
        _count_markers(totals, kept.values(), steps=spec.rollouts.steps)
        # Only the model's facts: older drivers also kept an actor's error there.
        model = {k: v for k, v in (plan.previous.get("model") or {}).items() if k in MODEL_FACTS}
        return cls(spec=spec, prep=prep, plan=plan, totals=totals, model_info=model,
                   started_at=clock[0], t0=clock[1], lease=lease,
                   units_redone=len(plan.untrusted), problems=problems)

    def attempt(self) -> dict[str, int]:
        """What this attempt added to the run's counts (from its receipts)."""
        now, before = self.totals, self.before
        return {"rollouts": (now.rollouts_ok + now.rollouts_failed)
                - (before.rollouts_ok + before.rollouts_failed),
                "generated_frames": now.generated_frames - before.generated_frames,
                "stored_frames": now.stored_frames - before.stored_frames,
                "units": now.units_done}

    @property
    def run_date(self) -> str:
        return self.spec.run.run_date.isoformat()

    @property
    def run_id(self) -> str:
        return self.spec.run.run_id

    def write_manifest(self, status: str, *, counts: Totals | None = None) -> None:
        """The manifest with `counts` (default: the running totals, receipts included)."""
        wall, attempt = time.monotonic() - self.t0, self.attempt()
        body = manifest_bytes(self.spec, status=status, fingerprint=self.fingerprint,
                              totals=counts or self.totals, model=self.model_info,
                              started_at=self.started_at, wall=wall, attempt=attempt,
                              throughput=self.throughput.plus(attempt["generated_frames"], wall),
                              seed_scope=self.plan.seed_scope)
        self.prep.storage.put_bytes(layout.manifest_key(self.run_date, self.run_id), body,
                                    content_type="application/json")


@dataclass(frozen=True, slots=True)
class _Launch:
    """How this attempt starts its actors: their class, the Ray cluster, their log level."""

    actor_cls: type
    ray_address: str | None
    connect_timeout_s: float
    actor_log_level: str | None


def run_job(spec: JobSpec, *, actor_cls: type, fresh: bool = False, progress: bool = True,
            on_event: EventHook | None = None, ray_address: str | None = None,
            connect_timeout_s: float = CONNECT_TIMEOUT_S,
            actor_log_level: str | None = None,
            check_seed: SeedCheck | None = None) -> RunSummary:
    """Run a job to completion (or resume it) with actors of `actor_cls`; its summary.

    Ray: the cluster at `ray_address` (else RAY_ADDRESS), else a private local instance
    (`connect_ray`). The run is held with a lease (one driver per run). Before `_SUCCESS`
    every committed unit is checked against storage; units that fail are redone (once more
    here, else by the next rerun) and the summary counts them in `units_redone`.

    Raises UserError for anything found before actors start (bad model source, unwritable
    output, no seeds, a changed plan, another driver on the run, an unreachable cluster,
    not enough cluster resources) and for a store that stops taking writes
    (StorageFatalError). Lost units are retried up to `resources.max_unit_attempts`; a run
    that still misses units returns complete=False. `actor_log_level` (e.g. "WARNING")
    overrides the actors' WHAM_LOG_LEVEL; `check_seed` (the actor side's seed reader) lets
    preflight read a sample of the seeds.
    """
    clock = (time.time(), time.monotonic())
    launch = _Launch(actor_cls=actor_cls, ray_address=ray_address,
                     connect_timeout_s=connect_timeout_s, actor_log_level=actor_log_level)
    prep = preflight(spec, check_seed=check_seed)
    set_log_context(run_id=spec.run.run_id)
    with RunLease(prep.storage, run_date=spec.run.run_date.isoformat(),
                  run_id=spec.run.run_id) as lease:
        if fresh:
            _discard_earlier_outputs(spec, prep)
        plan = _plan(spec, prep)
        problems = _reopen_units(spec, prep, plan)
        run = _Run.begin(spec, prep, plan, clock=clock, lease=lease, problems=problems)
        prog = Progress(run_id=run.run_id, totals=run.totals, show=progress,
                        hooks=[on_event] if on_event else [])
        _generate_and_verify(run, plan.todo(), launch=launch, prog=prog)
        summary = _commit(run)
    prog.emit("finished", detail=summary.line())  # the caller prints the summary
    return summary


def _discard_earlier_outputs(spec: JobSpec, prep: Prepared) -> None:
    """`--fresh`: every object of the run but its lease goes, before anything is planned."""
    removed = delete_run(prep.storage, run_date=spec.run.run_date.isoformat(),
                         run_id=spec.run.run_id)
    log.info("--fresh: removed %d objects of run %s", removed, spec.run.run_id)


def _plan(spec: JobSpec, prep: Prepared) -> RunPlan:
    """The run's units, checked against an earlier attempt's plan, and what storage holds of
    them. Reads only: `_reopen_units` acts on what it finds.

    The earlier plan is known from the manifest and, should that be missing or garbled,
    from the fingerprint every commit marker carries.
    """
    run_date, run_id = spec.run.run_date.isoformat(), spec.run.run_id
    check_plan_size(spec, len(prep.seeds))
    previous = _previous_manifest(prep, run_date, run_id)
    markers = read_markers(prep.storage, run_date=run_date, run_id=run_id)
    earlier = {m.get("plan_fingerprint") for m in markers.good.values()} - {None, ""}
    if previous and previous.get("plan_fingerprint"):
        earlier.add(previous["plan_fingerprint"])
    units, fingerprint, scope = _units(spec, prep, earlier=earlier)
    if earlier - {fingerprint}:
        raise UserError(f"run {run_id} already has outputs from a different plan (other "
                        "seeds, model, rollout or output.frames/image_tokens/watermark "
                        "settings, or an older wham-batch); pass --fresh to replace them or "
                        "use a new run.run_id")
    planned = {u.unit_id for u in units}
    committed = {uid: m for uid, m in markers.good.items() if uid in planned}
    return RunPlan(units=units, fingerprint=fingerprint, seed_scope=scope,
                   previous=previous or {}, committed=committed, untrusted=dict(markers.bad),
                   reopen=retryable_units(committed))


def _units(spec: JobSpec, prep: Prepared, *,
           earlier: set[str]) -> tuple[list[WorkUnit], str, str]:
    """The run's units, their fingerprint and the seed scope they use: `run.seed_scope`,
    except for a run started before rng seeds mixed in the run id, which its earlier
    fingerprints give away (they match the config-scoped plan): it keeps its seeds, so a
    resume completes it with the rollouts it started with."""
    scope = spec.run.seed_scope
    units = plan_for_spec(spec, prep.seeds, seed_scope=scope)
    fingerprint = run_fingerprint(spec, units)
    if scope == "run" and earlier and fingerprint not in earlier:
        legacy = plan_for_spec(spec, prep.seeds, seed_scope="config")
        legacy_fingerprint = run_fingerprint(spec, legacy)
        if earlier == {legacy_fingerprint}:
            log.info("run %s was started with rng seeds that do not mix in the run id "
                     "(run.seed_scope: config, the only scope before seed scopes); it keeps "
                     "them", spec.run.run_id)
            return legacy, legacy_fingerprint, "config"
    return units, fingerprint, scope


def _reopen_units(spec: JobSpec, prep: Prepared, plan: RunPlan) -> list[str]:
    """Make storage agree with the plan before generating: a marker that cannot be trusted
    is removed (its unit is redone) and reported, a unit whose rollouts a rerun may
    complete is reopened, and `_SUCCESS` goes first when either happens. The problems to
    report."""
    storage, run_date, run_id = prep.storage, spec.run.run_date.isoformat(), spec.run.run_id
    if plan.untrusted or plan.reopen:  # units are about to lose their markers: not complete
        storage.delete(layout.success_key(run_date, run_id))
    problems = []
    for unit_id, why in sorted(plan.untrusted.items()):
        problems.append(f"commit marker of unit {unit_id} could not be trusted ({why}); "
                        "the unit is redone")
        log.warning("run %s: %s", run_id, problems[-1])
        storage.delete(layout.commit_key(run_date, run_id, unit_id))
    reopened = reopen_retryable_units(storage, run_date=run_date, run_id=run_id,
                                      markers=plan.committed)
    if reopened:
        log.info("run %s: redoing %d units whose rollouts the model endpoint failed",
                 run_id, len(reopened))
    return problems


def _previous_manifest(prep: Prepared, run_date: str, run_id: str) -> dict[str, Any] | None:
    key = layout.manifest_key(run_date, run_id)
    previous = read_json(prep.storage, key)
    if previous == {}:
        log.warning("run %s: %s cannot be read; its plan is checked against the commit "
                    "markers instead", run_id, prep.storage.key_uri(key))
    if previous:
        layout.check_schema_version(previous.get("schema_version", layout.SCHEMA_VERSION),
                                    where=f"{prep.storage.key_uri(key)}")
    return previous


def _generate_and_verify(run: _Run, todo: list[WorkUnit], *, launch: _Launch,
                         prog: Progress) -> None:
    """Generate what is left, check what is committed against storage, and redo what fails
    the check (up to VERIFY_ROUNDS rounds)."""
    log.info("run %s: %d units (%d already committed), %d rollouts, output %s",
             run.run_id, len(run.units), run.totals.units_skipped,
             run.totals.rollouts_total, run.prep.storage.uri)
    for _ in range(VERIFY_ROUNDS):
        if todo:
            _generate(run, todo, launch=launch, prog=prog)
        todo = _verify(run)
        if not todo:
            break
    if prog.adaptations:  # one line for the run, not one per seed
        log.info("run %s: seeds made to fit the model: %s", run.run_id, ", ".join(
            f"{counted(n, 'seed')} {how}" for how, n in sorted(prog.adaptations.items())))


def _generate(run: _Run, todo: list[WorkUnit], *, launch: _Launch, prog: Progress) -> None:
    """Start or join Ray, fan the units out, and record what the actors report."""
    import ray

    target, _ = cluster_address(launch.ray_address)
    what = (f"connecting to the Ray cluster at {target}" if target
            else "starting a private local Ray instance")
    with StatusLine(what, show=prog.show):
        connection = connect_ray(launch.ray_address, timeout_s=launch.connect_timeout_s)
    try:
        log.info("%s", connection.describe())
        check_cluster(run.spec)
        run.write_manifest("running")
        scheduler = Scheduler(run.spec, todo, actor_cls=launch.actor_cls, prog=prog,
                              script=run.prep.script, log_level=launch.actor_log_level)
        run.model_info.update(scheduler.run())
    finally:
        prog.close()
        if connection.started:
            ray.shutdown()


def _verify(run: _Run) -> list[WorkUnit]:
    """Check every committed unit against storage; the units that fail, to redo.

    Their markers are removed first (and `_SUCCESS`, should an earlier attempt have written
    it), so a unit that fails again stays uncommitted for the next rerun.
    """
    storage, run_date, run_id = run.prep.storage, run.run_date, run.run_id
    planned = {u.unit_id: u for u in run.units}
    markers = read_markers(storage, run_date=run_date, run_id=run_id)  # one listing
    markers.good = {uid: m for uid, m in markers.good.items() if uid in planned}
    check = check_units(storage, run_date=run_date, run_id=run_id, markers=markers.good)
    bad = set(check.bad_units) | set(markers.bad)
    run.verified = {uid: m for uid, m in markers.good.items() if uid not in bad}
    if not bad:
        return []
    storage.delete(layout.success_key(run_date, run_id))
    for line in check.lines() + [f"unit {u}: commit marker cannot be trusted ({why})"
                                 for u, why in sorted(markers.bad.items())]:
        run.problems.append(line)
        log.warning("run %s: %s", run_id, line)
    for unit_id in sorted(bad):
        storage.delete(layout.commit_key(run_date, run_id, unit_id))
    run.units_redone += len(bad)
    log.warning("run %s: %d units failed the check against storage; redoing them", run_id,
                len(bad))
    return [replace(planned[uid], plan_fingerprint=run.fingerprint)
            for uid in sorted(bad)]


def _commit(run: _Run) -> RunSummary:
    """Write the final manifest, and _SUCCESS when the run is complete (every planned unit
    committed and verified, failed rollouts within the budget). Counts come from the
    verified markers, not from the attempt's receipts."""
    wall = time.monotonic() - run.t0
    attempt = run.attempt()  # what this attempt generated, redone units included
    totals = replace(run.totals)  # the run's counts: those of its verified markers
    totals.units_lost = len(run.units) - _count_markers(totals, run.verified.values(),
                                                        steps=run.spec.rollouts.steps)
    summary = RunSummary(
        run_id=run.run_id, run_date=run.run_date, output_uri=run.prep.storage.uri,
        complete=totals.units_lost == 0, units_total=len(run.units),
        units_skipped=totals.units_skipped, units_lost=totals.units_lost,
        rollouts_ok=totals.rollouts_ok, rollouts_failed=totals.rollouts_failed,
        generated_frames=totals.generated_frames, stored_frames=totals.stored_frames,
        wall_seconds=wall,
        frames_per_second=attempt["generated_frames"] / wall if wall > 0 else 0.0,
        max_failed_fraction=run.spec.run.max_failed_fraction, model=run.model_info,
        attempt_rollouts=attempt["rollouts"],
        attempt_generated_frames=attempt["generated_frames"],
        units_redone=run.units_redone, problems=list(run.problems))
    run.lease.check()  # a driver that lost its lease must not claim the run
    run.write_manifest(summary.status, counts=totals)
    for name in Totals.__slots__:  # progress hooks see the run's final counts from here on
        setattr(run.totals, name, getattr(totals, name))
    success = layout.success_key(run.run_date, run.run_id)
    if summary.status == "complete":  # _SUCCESS: what exit 0 and `runs` call complete
        run.prep.storage.put_bytes(success, b"", content_type="text/plain")
    elif run.prep.storage.exists(success):  # an earlier attempt's; this one says otherwise
        run.prep.storage.delete(success)
    return summary


def _count_markers(totals: Totals, markers: Iterable[dict[str, Any]], *, steps: int) -> int:
    """Set `totals`' rollout and frame counts to those of `markers`; how many there are."""
    done = totals_of(markers, steps=steps)
    totals.rollouts_ok, totals.rollouts_failed = done.ok, done.failed
    totals.generated_frames, totals.stored_frames = done.generated_frames or 0, done.stored_frames
    return done.units
