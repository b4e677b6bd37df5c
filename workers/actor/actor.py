"""RolloutActor: one WHAM replica that turns work units into committed outputs.

A plain class: tests call it directly; the driver wraps it with `ray.remote(...)`. The actor
is threaded (two calls at once) but only one unit computes at a time: while unit k waits
for its uploads and commit marker, unit k+1 already runs on the model.

A seed that cannot be loaded or a batch whose rollout raises becomes `failed` rollout rows
with the error; the actor itself never dies of it. Those rows are `retryable` (a rerun redoes
their unit) when the seed could not be read (`workers.actor.inputs.SeedReadError`) or the endpoint
failed them. Outputs that cannot be written are no rollout's fault: the unit fails (the
driver retries it; a store that refuses writes, `StorageFatalError`, stops the run).

The model is a `RolloutModel` (workers/actor/rollout_model.py): a local replica
(`model.checkpoint` / `model.preset`) or, with `model.endpoint`, a Muse-protocol endpoint.
The actor asks neither which: it hands the model a batch, the model hands every step to the
writer, and one outcome per rollout comes back.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.contracts.logs import log_context
from pipeline.contracts.plan import RolloutItem, UnitReceipt, WorkUnit
from pipeline.contracts.sources import NEUTRAL_ACTION, constant_action
from pipeline.contracts.spec import JobSpec
from pipeline.contracts.storage import StorageFatalError, open_storage
from workers.actor.inputs import load_seed, make_actions
from workers.actor.ray_hooks import install_ray_hooks, setup_actor_logging
from workers.actor.rollout_model import (
    Failed,
    RolloutInput,
    RolloutModel,
    Step,
    StepSink,
    is_retryable,
    open_model,
)
from workers.actor.writer import OutputWriter, WriteError, WriterSettings

log = logging.getLogger("workers.actor.actor")
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class _Ready:
    """One rollout with its inputs loaded, waiting to be batched."""

    item: RolloutItem
    job: RolloutInput


@dataclass(slots=True)
class _Tally:
    """What a unit's rollouts came to so far."""

    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    #: How its seeds were made to fit the model, counted once per seed (by the unit that
    #: holds the seed's first rollout).
    adapted: Counter[str] = field(default_factory=Counter)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


class RolloutActor:
    def __init__(self, spec: JobSpec, *, worker: str = "local",
                 script: np.ndarray | None = None) -> None:
        """Load the model and open the writer; `script` holds scripted actions (N,16)."""
        # In a Ray actor, metrics go to Ray and log lines carry run_id and worker (and unit
        # inside run_unit).
        install_ray_hooks()
        setup_actor_logging(run_id=spec.run.run_id, worker=worker)
        self.spec = spec
        self.worker = worker
        self.script = script
        self.model: RolloutModel = open_model(spec)
        self.batch_size = self.model.batch_size
        o = spec.output
        self.storage = open_storage(o.root, endpoint_url=o.endpoint_url, region=o.region)
        self.writer = OutputWriter(self.storage, WriterSettings.from_output(
            o, run_date=spec.run.run_date, run_id=spec.run.run_id,
            model_id=self.model.model_id, image_size=self.model.image_size,
            tokens_per_image=self.model.tokens_per_image))
        self._compute = threading.Lock()

    def ready(self) -> dict[str, Any]:
        """Small facts for the driver and the run manifest (also a liveness probe)."""
        return {"worker": self.worker, "pid": os.getpid(), "model_id": self.model.model_id,
                "sha256": self.model.sha256, "batch_size": self.batch_size,
                "device": self.model.device, "dtype": self.model.dtype}

    # ------------------------------------------------------------------ one unit

    def run_unit(self, unit: WorkUnit) -> UnitReceipt:
        with log_context(unit=unit.unit_id):
            return self._run_unit(unit)

    def _run_unit(self, unit: WorkUnit) -> UnitReceipt:
        try:
            with self._compute:
                t0 = time.perf_counter()  # not counting the wait for the other unit
                tally = self._generate(unit)
                generate_s = time.perf_counter() - t0
            result = self.writer.finish_unit(unit.unit_id,
                                             plan_fingerprint=unit.plan_fingerprint)
        except BaseException:
            # Not committed: drop what was buffered so a retry starts clean.
            self.writer.abort_unit(unit.unit_id)
            raise
        steps = self.spec.rollouts.steps
        return UnitReceipt(
            unit_id=unit.unit_id, ok=tally.ok, failed=tally.failed,
            generated_frames=tally.ok * steps,
            tokens=tally.ok * steps * self.model.tokens_per_step, generate_seconds=generate_s,
            write_seconds=result.write_seconds, worker=self.worker, errors=tally.errors,
            stored_frames=result.stored_frames, adaptations=dict(tally.adapted))

    def _generate(self, unit: WorkUnit) -> _Tally:
        tally = _Tally()
        ready: list[_Ready] = []
        by_seed: dict[str, list[RolloutItem]] = defaultdict(list)
        for item in unit.items:
            by_seed[item.seed_uri].append(item)
        for items in by_seed.values():
            started = _now()
            try:
                ready.extend(self._prepare(items, tally.adapted))
            except Exception as exc:
                self._fail(unit, items, exc, started=started, tally=tally)
        for batch in self._batches(ready):
            self._run_batch(unit, batch, tally)
        return tally

    def _batches(self, ready: list[_Ready]) -> Iterator[list[_Ready]]:
        # Rows of one batch must share a context length; seeds may differ in it.
        by_len: dict[int, list[_Ready]] = defaultdict(list)
        for r in ready:
            by_len[len(r.job.context_images)].append(r)
        for group in by_len.values():
            for start in range(0, len(group), self.batch_size):
                yield group[start:start + self.batch_size]

    def _prepare(self, items: list[RolloutItem], adapted: Counter[str]) -> list[_Ready]:
        """Load one seed and build the given actions/observations of its rollouts; count how
        the seed was adapted in `adapted` (once per run: by the unit of its first rollout)."""
        spec = self.spec
        steps, mode, kind = spec.rollouts.steps, spec.rollouts.mode, spec.rollouts.actions.kind
        needs_future = mode == "policy" or (mode == "world_model" and kind == "replay")
        seed = load_seed(items[0].seed_ref(), image_size=tuple(self.model.image_size),
                         context_steps=spec.seeds.context_steps,
                         future_steps=steps if needs_future else 0,
                         endpoint_url=spec.seeds.endpoint_url, region=spec.seeds.region,
                         max_bytes=int(spec.seeds.max_file_mb * 2**20))
        if items[0].rollout_index == 0:
            adapted.update(seed.adapted)
        ctx_images = np.asarray(seed.context_images, dtype=np.uint8)
        ctx_actions = (np.asarray(seed.context_actions, dtype=np.int64)
                       if seed.context_actions is not None
                       else np.tile(NEUTRAL_ACTION, (len(ctx_images), 1)))
        observations = None
        if mode == "policy":
            if seed.future_images is None or len(seed.future_images) < steps:
                have = 0 if seed.future_images is None else len(seed.future_images)
                raise ValueError(f"seed {seed.seed_id}: policy mode needs {steps} recorded "
                                 f"frames after the context, the clip has {have}")
            observations = np.asarray(seed.future_images[:steps], dtype=np.uint8)
        constant = (constant_action(spec.rollouts.actions.value) if kind == "constant" else None)
        out = []
        for item in items:
            actions = None
            if mode == "world_model":
                actions = make_actions(kind, steps=steps, rng_seed=item.rng_seed,
                                       constant=constant, script=self.script, seed=seed)
            out.append(_Ready(item=item, job=RolloutInput(
                context_images=ctx_images, context_actions=ctx_actions, actions=actions,
                observations=observations, rng_seed=item.rng_seed)))
        return out

    def _run_batch(self, unit: WorkUnit, batch: list[_Ready], tally: _Tally) -> None:
        """Roll the batch out (every step goes to the writer as it comes) and record each
        rollout's row: ok with its quality aggregates, or failed with its error."""
        started = _now()
        t = time.perf_counter()
        try:
            outcomes = self.model.roll_out([r.job for r in batch],
                                           on_step=self._to_writer(unit, batch))
        except WriteError as exc:  # outputs failed, not rollouts: the unit fails
            if isinstance(exc.__cause__, StorageFatalError):
                raise exc.__cause__ from None  # as it is: the driver stops the run
            raise
        except StorageFatalError:
            raise
        except Exception as exc:
            log.exception("unit %s: batch failed", unit.unit_id)
            self._fail(unit, [r.item for r in batch], exc, started=started, tally=tally)
            return
        seconds = time.perf_counter() - t
        for r, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Failed):
                self._fail(unit, [r.item], outcome.error, started=started, tally=tally)
                continue
            self.writer.finish_rollout(unit.unit_id, {**self._row(
                r.item, status="ok", error=None, started=started,
                context_steps=len(r.job.context_images), seconds=seconds), **outcome.quality})
            tally.ok += 1

    def _to_writer(self, unit: WorkUnit, batch: list[_Ready]) -> StepSink:
        def on_step(b: int, s: Step) -> None:
            self.writer.add_step(unit.unit_id, batch[b].item.rollout_id, step=s.step,
                                 image=s.image, action=s.action, generated=s.generated,
                                 action_source=s.action_source, image_tokens=s.image_tokens,
                                 quality=s.quality)
        return on_step

    def _fail(self, unit: WorkUnit, items: list[RolloutItem], exc: BaseException, *,
              started: dt.datetime, tally: _Tally) -> None:
        message = _short(exc)
        seeds = sorted({item.seed_id for item in items})
        tally.errors.append(f"seed {seeds[0]}: {message}" if len(seeds) == 1
                            else f"{len(items)} rollouts of seeds {', '.join(seeds)}: {message}")
        for item in items:
            row = self._row(item, status="failed", error=message, started=started,
                            context_steps=0, seconds=0.0)
            # The commit marker counts these, and a rerun redoes their unit.
            self.writer.finish_rollout(unit.unit_id, row, retryable=is_retryable(exc))
        tally.failed += len(items)

    def _row(self, item: RolloutItem, *, status: str, error: str | None, started: dt.datetime,
             context_steps: int, seconds: float) -> dict[str, Any]:
        r = self.spec.rollouts
        mode_policy = {"world_model": r.actions.kind, "policy": "model", "full": "model"}
        return {
            "rollout_id": item.rollout_id, "seed_id": item.seed_id, "seed_uri": item.seed_uri,
            "rollout_index": item.rollout_index, "mode": r.mode,
            "action_policy": mode_policy[r.mode], "context_steps": context_steps,
            "generated_steps": r.steps if status == "ok" else 0,
            "temperature": r.sampling.temperature, "top_k": r.sampling.top_k,
            "top_p": r.sampling.top_p, "greedy": r.sampling.greedy,
            "decoding": self.model.decoding, "rng_seed": item.rng_seed,
            "model_id": self.model.model_id, "model_sha256": self.model.sha256,
            "status": status, "error": error, "worker": self.worker, "started_at": started,
            "finished_at": _now(), "generate_seconds": seconds,
        }

    def close(self) -> None:
        self.writer.close()
        self.model.close()
