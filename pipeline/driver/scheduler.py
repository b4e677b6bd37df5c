"""Fan-out: keep every actor busy with work units until none are left.

The scheduler starts the actors (the class is given to it; the driver side never imports
the actor side), probes them until they are ready, keeps up to `units_in_flight` units on
each, and handles what comes back: a receipt, a unit that raised, an actor that died (Ray
restarts it; its units are resubmitted, up to `max_unit_attempts`), an actor that never
starts, a unit that overruns `unit_timeout_s`. Every wait on Ray has a timeout, so a stuck
actor is detected (and killed for a restart) instead of hanging the run. A retried unit
waits a backoff first; a unit that failed because the output storage is full, read-only or
refuses access (`StorageFatalError`) stops the run at once: retries cannot help, and what
is committed stays for a rerun.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pipeline.contracts.errors import UserError
from pipeline.contracts.logs import LOG_LEVEL_ENV
from pipeline.contracts.metrics import Metrics
from pipeline.contracts.plan import UnitReceipt, WorkUnit
from pipeline.contracts.spec import JobSpec
from pipeline.contracts.storage import StorageFatalError, backoff_delay
from pipeline.driver.lease import env_seconds
from pipeline.driver.progress import Progress

log = logging.getLogger("pipeline.driver")
WAIT_S = 1.0  # longest single ray.wait; the loop re-checks timeouts between waits
REPROBE_S = 0.5  # pause between liveness probes of a restarting actor
#: Longest wait for an actor to load its model (`WHAM_ACTOR_START_TIMEOUT_S`).
ACTOR_START_TIMEOUT_S = 1800.0
#: Facts of a ready actor that go into the run manifest's `model` entry.
MODEL_FACTS = ("model_id", "sha256", "batch_size", "device", "dtype")


def actor_name(run_id: str, index: int) -> str:
    """Ray name of a run's actor: tools (and tests) find a run's actors by it, and a second
    driver for the same run id in the same namespace fails to create them."""
    return f"wham-batch:{run_id}:actor-{index:03d}"


def describe_actor(info: dict[str, Any]) -> str:
    """A ready actor's facts as one readable phrase (not a dict)."""
    sha = str(info.get("sha256") or "")[:12]
    model = f"model {info.get('model_id', '?')}" + (f" ({sha})" if sha else "")
    where = " ".join(str(info[k]) for k in ("device", "dtype") if info.get(k))
    parts = [model, f"batch {info['batch_size']}" if "batch_size" in info else "", where,
             f"pid {info['pid']}" if "pid" in info else ""]
    return ", ".join(p for p in parts if p)


class SlotState(Enum):
    """Where an actor stands: loading its model, taking units, being asked again after it
    died mid-unit (Ray restarts it), or gone for good."""

    STARTING = "starting"
    READY = "ready"
    PROBING = "probing"
    DEAD = "dead"


@dataclass(slots=True)
class InFlight:
    """A unit handed to an actor: which attempt it is, and since when it runs (monotonic;
    reset when its actor is killed for overrunning, so one overrun kills once)."""

    unit: WorkUnit
    attempt: int
    started: float


@dataclass
class _Slot:
    """One actor as the driver sees it: its handle, state and units in flight."""

    name: str
    handle: Any
    state: SlotState = SlotState.STARTING
    probe: Any = None  # ready() ref while starting/probing
    since: float = field(default_factory=time.monotonic)
    inflight: dict[Any, InFlight] = field(default_factory=dict)  # result ref -> its unit
    reprobe_at: float | None = None  # when to ask a restarting actor again


class Scheduler:
    """Runs `todo` on up to `resources.actors` actors of `actor_cls`; `run()` returns the
    model facts the actors reported (model_id, sha256, batch_size, device, dtype). Why
    actors died for good is kept apart, in `actor_errors`."""

    def __init__(self, spec: JobSpec, todo: list[WorkUnit], *, actor_cls: type,
                 prog: Progress, script: Any = None, log_level: str | None = None) -> None:
        self.spec = spec
        self.prog = prog
        self.queue: deque[tuple[WorkUnit, int]] = deque((u, 1) for u in todo)
        self.not_before: dict[str, float] = {}  # unit id -> when its retry may start
        self.model_info: dict[str, Any] = {}
        self.actor_errors: list[str] = []  # why actors died for good, oldest first
        self.metrics = Metrics(spec.run.run_id)
        self.start_timeout_s = env_seconds("WHAM_ACTOR_START_TIMEOUT_S", ACTOR_START_TIMEOUT_S)
        self.slots = self._start_actors(actor_cls, count=min(spec.resources.actors, len(todo)),
                                        script=script, log_level=log_level)
        prog.start(actors=len(self.slots))

    def _start_actors(self, actor_cls: type, *, count: int, script: Any,
                      log_level: str | None) -> list[_Slot]:
        import ray

        r = self.spec.resources
        # Actors read their log level from the environment (pipeline.contracts.logs); Ray merges
        # these variables into the job's own.
        env = {"runtime_env": {"env_vars": {LOG_LEVEL_ENV: log_level}}} if log_level else {}
        remote_cls = ray.remote(
            num_gpus=r.gpus_per_actor, num_cpus=r.cpus_per_actor, max_restarts=r.max_restarts,
            max_task_retries=0, max_concurrency=2,
        )(actor_cls)
        slots = []
        for i in range(count):
            name = f"actor-{i:03d}"
            handle = remote_cls.options(name=actor_name(self.spec.run.run_id, i), **env).remote(
                self.spec, worker=name, script=script)
            slots.append(_Slot(name=name, handle=handle, probe=handle.ready.remote()))
        return slots

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        try:
            while self.queue or any(s.inflight for s in self.slots):
                live = [s for s in self.slots if s.state is not SlotState.DEAD]
                if not live:
                    last = self.actor_errors[-1] if self.actor_errors else "unknown"
                    raise UserError(f"every actor failed; see the errors above (last: {last})")
                self._submit(live)
                self._collect(live)
                self._check_timeouts()
                self.prog.tick()
        finally:
            self.shutdown()
        return self.model_info

    def _submit(self, live: list[_Slot]) -> None:
        """Re-probe restarting actors when due; top up every ready actor's units."""
        limit = self.spec.resources.units_in_flight
        for s in live:
            if s.reprobe_at is not None and time.monotonic() >= s.reprobe_at:
                s.reprobe_at, s.probe = None, s.handle.ready.remote()
            while (s.state is SlotState.READY and len(s.inflight) < limit
                   and (job := self._next_due())):
                unit, attempt = job
                s.inflight[s.handle.run_unit.remote(unit)] = InFlight(unit, attempt,
                                                                      time.monotonic())

    def _next_due(self) -> tuple[WorkUnit, int] | None:
        """The first queued unit whose retry backoff is over (taken off the queue)."""
        now = time.monotonic()
        for i, (unit, attempt) in enumerate(self.queue):
            if self.not_before.get(unit.unit_id, 0.0) <= now:
                del self.queue[i]
                return unit, attempt
        return None

    def _collect(self, live: list[_Slot]) -> None:
        """Wait (at most WAIT_S) for receipts and probes, then handle all that are done."""
        import ray

        owners = {ref: s for s in live for ref in s.inflight}
        self.metrics.set_units_in_flight(len(owners))
        probes = {s.probe: s for s in live if s.probe is not None}
        refs = list(owners) + list(probes)
        if not refs:  # only retries waiting for their backoff, or actors to re-probe
            time.sleep(REPROBE_S)
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=WAIT_S)
        if done:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in probes:
                self._probe_done(probes[ref], ref)
            else:
                self._receipt_done(owners[ref], ref)

    def _receipt_done(self, slot: _Slot, ref: Any) -> None:
        import ray
        from ray.exceptions import RayActorError

        job = slot.inflight.pop(ref)
        try:
            receipt: UnitReceipt = ray.get(ref, timeout=WAIT_S)
        except RayActorError as exc:
            self.lose(job, f"{slot.name} died: {type(exc).__name__}")
            if slot.state is SlotState.READY:
                slot.state, slot.probe = SlotState.PROBING, slot.handle.ready.remote()
                slot.since = time.monotonic()
            return
        except Exception as exc:  # the unit raised inside a live actor
            cause = getattr(exc, "cause", exc)  # Ray wraps it in a RayTaskError
            if isinstance(cause, StorageFatalError):
                raise StorageFatalError(f"stopping the run: {cause}") from None
            self.lose(job, f"{type(exc).__name__}: {str(exc)[-300:]}")
            return
        for error in receipt.errors:  # seeds that could not be read, batches that raised
            log.warning("unit %s: rollouts failed: %s", job.unit.unit_id, error)
        self.prog.unit_done(receipt)
        self.metrics.record_receipt(receipt)
        self.metrics.record_unit_committed()

    def _probe_done(self, slot: _Slot, ref: Any) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        slot.probe = None
        try:
            info = ray.get(ref, timeout=WAIT_S)
        except ActorUnavailableError:
            slot.reprobe_at = time.monotonic() + REPROBE_S  # restarting: ask again shortly
            return
        except RayActorError as exc:
            lines = str(exc).strip().splitlines()
            cause = lines[-1] if lines else type(exc).__name__
            self.actor_errors.append(cause)
            log.error("%s is dead and will not restart: %s", slot.name, cause)
            self._dead(slot, f"{slot.name} died: {cause}")
            return
        slot.state = SlotState.READY
        for key in MODEL_FACTS:
            if key in info:
                self.model_info.setdefault(key, info[key])
        log.info("%s ready: %s", slot.name, describe_actor(info))
        self.prog.actor_ready(slot.name)

    # ---------------------------------------------------------------- failures

    def _dead(self, slot: _Slot, why: str) -> None:
        """Mark `slot` dead; its units in flight are lost (a dead slot is never collected
        from) and retried elsewhere."""
        slot.state = SlotState.DEAD
        for job in slot.inflight.values():
            self.lose(job, why)
        slot.inflight.clear()

    def lose(self, job: InFlight, why: str) -> None:
        """A unit came back without a receipt: retry it, or count it lost for good."""
        unit, attempt = job.unit, job.attempt
        if attempt < self.spec.resources.max_unit_attempts:
            self.queue.appendleft((unit, attempt + 1))
            self.not_before[unit.unit_id] = time.monotonic() + backoff_delay(attempt - 1)
            self.prog.unit_retried(unit.unit_id, why)
            log.warning("unit %s attempt %d lost (%s); retrying", unit.unit_id, attempt, why)
        else:
            self.prog.unit_lost(unit.unit_id, why)
            log.error("unit %s lost after %d attempts: %s", unit.unit_id, attempt, why)

    def _check_timeouts(self) -> None:
        """Kill (for a restart) an actor whose unit overran unit_timeout_s or that never
        started."""
        import ray

        now = time.monotonic()
        timeout = self.spec.resources.unit_timeout_s
        for s in self.slots:
            if s.state is SlotState.DEAD:
                continue
            overdue = [job for job in s.inflight.values() if now - job.started > timeout]
            if s.probe is not None and now - s.since > self.start_timeout_s:
                self._dead(s, f"{s.name} did not start within {self.start_timeout_s:.0f}s")
                ray.kill(s.handle, no_restart=True)
            elif overdue:
                log.warning("%s: unit overran %.0fs; restarting the actor", s.name, timeout)
                ray.kill(s.handle, no_restart=False)
                # Restart the clock so the same overdue unit does not trigger a second kill
                # before its error arrives.
                for job in overdue:
                    job.started = now

    def shutdown(self) -> None:
        import ray

        self.metrics.set_units_in_flight(0)
        for s in self.slots:
            ray.kill(s.handle, no_restart=True)
