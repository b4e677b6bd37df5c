"""The Ray driver: check, plan, fan work units out to actors, collect receipts, commit the run.

Only small descriptors go out (units of rollout ids and seed URIs) and only receipts come
back; frames go from the actors straight to storage. Every wait on Ray has a timeout, so a
stuck actor is detected (and killed for a restart) instead of hanging the run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.logs import set_log_context
from pipeline.metrics import Metrics
from pipeline.plan import (
    UnitReceipt,
    WorkUnit,
    committed_unit_ids,
    pending_units,
    plan_fingerprint,
    plan_for_spec,
)
from pipeline.progress import EventHook, Progress, Totals
from pipeline.spec import JobSpec

log = logging.getLogger("pipeline.driver")
WAIT_S = 1.0  # longest single ray.wait; the loop re-checks timeouts between waits
REPROBE_S = 0.5  # pause between liveness probes of a restarting actor
MARKER_READERS = 16  # parallel reads of commit markers when resuming
ACTOR_START_TIMEOUT_S = float(os.environ.get("WHAM_ACTOR_START_TIMEOUT_S", "1800"))
OUTPUT_TABLES = ("steps", "rollouts", "frames", "previews", "_runs")


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
class _Slot:
    """One actor as the driver sees it: its handle, state and units in flight."""

    name: str
    handle: Any
    state: str = "starting"  # starting | ready | probing | dead
    probe: Any = None  # ready() ref while starting/probing
    since: float = field(default_factory=time.monotonic)
    inflight: dict[Any, tuple[WorkUnit, int, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    reprobe_at: float | None = None  # when to ask a restarting actor again




# ---------------------------------------------------------------- preflight (no actors yet)


def _check_model_source(spec: JobSpec) -> None:
    src = spec.model.checkpoint
    if src is None:
        from workers.wham import PRESETS

        if spec.model.preset not in PRESETS:
            raise UserError(f"model.preset: unknown preset {spec.model.preset!r}; "
                            f"choose one of {', '.join(PRESETS)}")
        return
    if src.startswith("s3://"):
        from pipeline.storage import open_storage

        parent, _, name = src.rstrip("/").rpartition("/")
        store = open_storage(parent, endpoint_url=spec.model.endpoint_url,
                             region=spec.model.region)
        if not (store.exists(name) or store.exists(f"{name}/config.json")):
            raise UserError(f"model.checkpoint: {src} not found (no such object or folder)")
    elif not os.path.exists(src):
        raise UserError(f"model.checkpoint: {src} does not exist")


@dataclass(slots=True)
class Prepared:
    """What preflight found: the output storage, the seeds and a scripted action table."""

    storage: Any
    seeds: list[Any]
    script: Any = None  # np.ndarray (N,16) for rollouts.actions.kind == "file"


def preflight(spec: JobSpec) -> Prepared:
    """Everything that can fail before an actor starts: model, actions, output, seeds."""
    from pipeline.seeds import discover_seeds
    from pipeline.storage import open_storage

    _check_model_source(spec)
    script = None
    if spec.rollouts.actions.kind == "file":
        from pipeline.action_sources import load_action_script

        script = load_action_script(spec.rollouts.actions.path,
                                    endpoint_url=spec.seeds.endpoint_url, region=spec.seeds.region)
    storage = open_storage(spec.output.root, endpoint_url=spec.output.endpoint_url,
                           region=spec.output.region)
    storage.check_writable()
    s = spec.seeds
    seeds = discover_seeds(s.source, format=s.format, glob=s.glob, limit=s.limit,
                           endpoint_url=s.endpoint_url, region=s.region)
    if not seeds:
        raise UserError(f"seeds.source: no seeds found under {s.source} "
                        f"(format {s.format}, glob {s.glob or 'default'})")
    return Prepared(storage=storage, seeds=seeds, script=script)


def _check_cluster(spec: JobSpec) -> None:
    import ray

    res = ray.cluster_resources()
    r = spec.resources
    for kind, per_actor in (("GPU", r.gpus_per_actor), ("CPU", r.cpus_per_actor)):
        have = float(res.get(kind, 0.0))
        need = per_actor * r.actors
        if per_actor > 0 and have + 1e-9 < need:
            fit = int(have // per_actor) if per_actor else 0
            raise UserError(
                f"resources: {r.actors} actors x {per_actor} {kind} = {need:g} {kind}s, but the "
                f"Ray cluster has {have:g}; lower resources.actors (at most {fit} fit) or "
                f"resources.{kind.lower()}s_per_actor")


def _connect_ray() -> bool:
    """Connect to RAY_ADDRESS when set, else start a private local instance. True if started."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    return True


# ---------------------------------------------------------------- manifest / layout helpers


def _manifest(spec: JobSpec, *, status: str, fingerprint: str, totals: Totals,
              model: dict[str, Any], started_at: float, wall: float) -> bytes:
    from pipeline.layout import SCHEMA_VERSION

    body = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "run_id": spec.run.run_id,
        "run_date": spec.run.run_date.isoformat(),
        "plan_fingerprint": fingerprint,
        "model": model,
        "counts": asdict(totals),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "wall_seconds": round(wall, 3),
        "frames_per_second": round(totals.frames / wall, 3) if wall > 0 else 0.0,
        "spec": spec.public_dict(),
    }
    return json.dumps(body, indent=2).encode()


def _read_json(storage: Any, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get_bytes(key))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}


def run_fingerprint(spec: JobSpec, units: Sequence[WorkUnit]) -> str:
    """The plan plus every setting that changes what a unit writes: a resumed run must
    match it, or its old and new units would disagree."""
    import hashlib

    settings = {
        "plan": plan_fingerprint(units),
        "model": spec.model.model_dump(mode="json", include={"checkpoint", "preset"}),
        "seeds": spec.seeds.model_dump(mode="json", include={"format", "context_steps"}),
        "rollouts": spec.rollouts.model_dump(mode="json"),
        "output": spec.output.model_dump(mode="json", include={"frames", "image_tokens",
                                                               "watermark"}),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def delete_run(storage: Any, *, run_date: str, run_id: str) -> int:
    from pipeline.layout import run_prefix

    return sum(storage.delete_prefix(run_prefix(t, run_date, run_id)) for t in OUTPUT_TABLES)


def _totals_from_markers(storage: Any, *, run_date: str, run_id: str, steps: int,
                         unit_ids: Sequence[str], totals: Totals) -> None:
    """Counts of units committed by earlier attempts of this run (their commit markers)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.layout import commit_key

    keys = [commit_key(run_date, run_id, uid) for uid in unit_ids]
    # One small GET per marker; in parallel, as a resumed S3 run may have thousands.
    with ThreadPoolExecutor(MARKER_READERS) as pool:
        markers = list(pool.map(lambda key: _read_json(storage, key) or {}, keys))
    for marker in markers:
        ok = int(marker.get("ok", 0))
        totals.rollouts_ok += ok
        totals.rollouts_failed += int(marker.get("failed", 0))
        totals.frames += ok * steps  # generated frames, as in receipts


# ---------------------------------------------------------------- the run


def run_job(spec: JobSpec, *, fresh: bool = False, actor_cls: type | None = None,
            progress: bool = True, on_event: EventHook | None = None) -> RunSummary:
    """Run a job to completion (or resume it) and return its summary.

    Raises UserError for anything found before actors start (bad model source, unwritable
    output, no seeds, not enough cluster resources). Lost units are retried up to
    `resources.max_unit_attempts`; a run that still misses units returns complete=False.
    """
    from pipeline.layout import manifest_key, success_key

    t0 = time.monotonic()
    started_at = time.time()
    prep = preflight(spec)
    storage = prep.storage
    run_date, run_id = spec.run.run_date.isoformat(), spec.run.run_id
    set_log_context(run_id=run_id)
    if fresh:
        removed = delete_run(storage, run_date=run_date, run_id=run_id)
        log.info("--fresh: removed %d objects of run %s", removed, run_id)
    units = plan_for_spec(spec, prep.seeds)
    fingerprint = run_fingerprint(spec, units)
    previous = _read_json(storage, manifest_key(run_date, run_id))
    if previous and previous.get("plan_fingerprint") not in (None, fingerprint):
        raise UserError(f"run {run_id} already has outputs from a different plan (other "
                        "seeds, model or rollout settings); pass --fresh to replace them or use "
                        "a new run.run_id")
    committed = committed_unit_ids(storage, run_date=run_date, run_id=run_id)
    todo = pending_units(units, committed)
    totals = Totals(rollouts_total=sum(u.num_rollouts for u in units), units_total=len(units),
                    units_skipped=len(units) - len(todo))
    _totals_from_markers(storage, run_date=run_date, run_id=run_id, totals=totals,
                         steps=spec.rollouts.steps,
                         unit_ids=[u.unit_id for u in units if u.unit_id in committed])
    prog = Progress(run_id=run_id, totals=totals, show=progress,
                    hooks=[on_event] if on_event else [])
    model_info: dict[str, Any] = previous.get("model", {}) if previous else {}

    def write_manifest(status: str) -> None:
        storage.put_bytes(manifest_key(run_date, run_id), _manifest(
            spec, status=status, fingerprint=fingerprint, totals=totals, model=model_info,
            started_at=started_at, wall=time.monotonic() - t0), content_type="application/json")

    log.info("run %s: %d units (%d already committed), %d rollouts, output %s",
             run_id, len(units), totals.units_skipped, totals.rollouts_total, storage.uri)
    if todo:
        started_ray = _connect_ray()
        try:
            _check_cluster(spec)
            write_manifest("running")
            prog.start()
            model_info.update(_fan_out(spec, todo, actor_cls=actor_cls, prog=prog,
                                        script=prep.script))
        finally:
            prog.close()
            if started_ray:
                import ray

                ray.shutdown()
    wall = time.monotonic() - t0
    complete = totals.units_lost == 0
    write_manifest("complete" if complete else "incomplete")
    if complete:
        storage.put_bytes(success_key(run_date, run_id), b"", content_type="text/plain")
    summary = RunSummary(
        run_id=run_id, run_date=run_date, output_uri=storage.uri, complete=complete,
        units_total=len(units), units_skipped=totals.units_skipped, units_lost=totals.units_lost,
        rollouts_ok=totals.rollouts_ok, rollouts_failed=totals.rollouts_failed,
        frames=totals.frames, wall_seconds=wall,
        frames_per_second=totals.frames / wall if wall > 0 else 0.0,
        max_failed_fraction=spec.run.max_failed_fraction, model=model_info)
    prog.emit("finished", detail=summary.line())
    log.info(summary.line())
    return summary


def actor_name(run_id: str, index: int) -> str:
    return f"wham-batch:{run_id}:actor-{index:03d}"


def _fan_out(spec: JobSpec, todo: list[WorkUnit], *, actor_cls: type | None,
             prog: Progress, script: Any) -> dict[str, Any]:
    """Keep every ready actor busy with up to units_in_flight units until the queue drains."""
    import ray
    from ray.exceptions import RayActorError

    from workers.actor import RolloutActor

    r = spec.resources
    remote_cls = ray.remote(
        num_gpus=r.gpus_per_actor, num_cpus=r.cpus_per_actor, max_restarts=r.max_restarts,
        max_task_retries=0, max_concurrency=2,
    )(actor_cls or RolloutActor)
    slots = []
    for i in range(min(r.actors, len(todo))):
        name = f"actor-{i:03d}"
        # Named so tools (and tests) can find a run's actors; a second driver for the same
        # run id in the same namespace fails here instead of racing this one.
        handle = remote_cls.options(name=actor_name(spec.run.run_id, i)).remote(
            spec, worker=name, script=script)
        slots.append(_Slot(name=name, handle=handle, probe=handle.ready.remote()))
    queue: deque[tuple[WorkUnit, int]] = deque((u, 1) for u in todo)
    model_info: dict[str, Any] = {}
    metrics = Metrics(spec.run.run_id)

    def lose(unit: WorkUnit, attempt: int, why: str) -> None:
        if attempt < r.max_unit_attempts:
            prog.totals.units_retried += 1
            queue.appendleft((unit, attempt + 1))
            prog.emit("unit_retried", unit_id=unit.unit_id, detail=why)
            log.warning("unit %s attempt %d lost (%s); retrying", unit.unit_id, attempt, why)
        else:
            prog.totals.units_lost += 1
            prog.emit("unit_lost", unit_id=unit.unit_id, detail=why)
            log.error("unit %s lost after %d attempts: %s", unit.unit_id, attempt, why)

    try:
        while queue or any(s.inflight for s in slots):
            live = [s for s in slots if s.state != "dead"]
            if not live:
                raise UserError("every actor failed; see the errors above "
                                f"(last: {model_info.get('error', 'unknown')})")
            for s in live:
                if s.reprobe_at is not None and time.monotonic() >= s.reprobe_at:
                    s.reprobe_at, s.probe = None, s.handle.ready.remote()
                while s.state == "ready" and queue and len(s.inflight) < r.units_in_flight:
                    unit, attempt = queue.popleft()
                    ref = s.handle.run_unit.remote(unit)
                    s.inflight[ref] = (unit, attempt, time.monotonic())
            owners = {ref: s for s in live for ref in s.inflight}
            metrics.set_units_in_flight(len(owners))
            probes = {s.probe: s for s in live if s.probe is not None}
            refs = list(owners) + list(probes)
            done, _ = ray.wait(refs, num_returns=1, timeout=WAIT_S)
            if done:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                if ref in probes:
                    slot = probes[ref]
                    _probe_done(slot, ref, model_info)
                    if slot.state == "ready":
                        prog.emit("actor_ready", detail=slot.name)
                    continue
                slot = owners[ref]
                unit, attempt, _ = slot.inflight.pop(ref)
                try:
                    receipt: UnitReceipt = ray.get(ref, timeout=WAIT_S)
                except RayActorError as exc:
                    lose(unit, attempt, f"{slot.name} died: {type(exc).__name__}")
                    if slot.state == "ready":
                        slot.state, slot.probe = "probing", slot.handle.ready.remote()
                        slot.since = time.monotonic()
                    continue
                except Exception as exc:  # the unit raised inside a live actor
                    lose(unit, attempt, f"{type(exc).__name__}: {str(exc)[-300:]}")
                    continue
                prog.unit_done(receipt)
                metrics.record_receipt(receipt)
                metrics.record_unit_committed()
            _check_timeouts(slots, spec, lose)
    finally:
        metrics.set_units_in_flight(0)
        for s in slots:
            ray.kill(s.handle, no_restart=True)
    return model_info


def _probe_done(slot: _Slot, ref: Any, model_info: dict[str, Any]) -> None:
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    slot.probe = None
    try:
        slot.info = ray.get(ref, timeout=WAIT_S)
    except ActorUnavailableError:
        slot.reprobe_at = time.monotonic() + REPROBE_S  # restarting: ask again shortly
        return
    except RayActorError as exc:
        slot.state = "dead"
        cause = str(exc).strip().splitlines()
        model_info.setdefault("error", cause[-1] if cause else type(exc).__name__)
        log.error("%s is dead and will not restart: %s", slot.name, model_info["error"])
        return
    slot.state = "ready"
    for key in ("model_id", "sha256", "batch_size", "device", "dtype"):
        if key in slot.info:
            model_info.setdefault(key, slot.info[key])
    log.info("%s ready: %s", slot.name, slot.info)


def _check_timeouts(slots: list[_Slot], spec: JobSpec,
                    lose: Callable[[WorkUnit, int, str], None]) -> None:
    """Kill (for a restart) an actor whose unit overran unit_timeout_s or that never started."""
    import ray

    now = time.monotonic()
    for s in slots:
        if s.state == "dead":
            continue
        overdue = [ref for ref, (_, _, t) in s.inflight.items()
                   if now - t > spec.resources.unit_timeout_s]
        if s.probe is not None and now - s.since > ACTOR_START_TIMEOUT_S:
            s.state = "dead"
            for unit, attempt, _ in s.inflight.values():
                lose(unit, attempt, f"{s.name} did not start within {ACTOR_START_TIMEOUT_S:.0f}s")
            s.inflight.clear()
            ray.kill(s.handle, no_restart=True)
        elif overdue:
            log.warning("%s: unit overran %.0fs; restarting the actor", s.name,
                        spec.resources.unit_timeout_s)
            ray.kill(s.handle, no_restart=False)
            # Restart the clock so the same overdue unit does not trigger a second kill
            # before its error arrives.
            for ref in overdue:
                unit, attempt, _ = s.inflight[ref]
                s.inflight[ref] = (unit, attempt, now)
