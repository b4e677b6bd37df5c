"""RolloutActor: one WHAM replica that turns work units into committed outputs.

A plain class: tests call it directly; the driver wraps it with `ray.remote(...)`. The actor
is threaded (two calls at once) but only one unit computes at a time: while unit k waits
for its uploads and commit marker, unit k+1 already runs on the engine.

A seed that cannot be loaded or a batch whose rollout raises becomes `failed` rollout rows
with the error; the actor itself never dies of it. Those rows are `retryable` (a rerun redoes
their unit) when the seed could not be read (`workers.actor.inputs.SeedReadError`) or the endpoint
failed them. Outputs that cannot be written are no rollout's fault: the unit fails (the
driver retries it; a store that refuses writes, `StorageFatalError`, stops the run).

The model is a local replica (`model.checkpoint` / `model.preset`), or with `model.endpoint`
an `EndpointBackend` that rolls out through a Muse-protocol endpoint: it carries the same
model facts, and `_run_batch` hands it the batch instead of the engine. A rollout the
endpoint could not finish fails alone; its row is marked retryable, so a rerun redoes it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.contracts.layout import STEP_QUALITY_COLUMNS
from pipeline.contracts.logs import log_context
from pipeline.contracts.plan import RolloutItem, UnitReceipt, WorkUnit
from pipeline.contracts.quality import rollout_quality
from pipeline.contracts.sources import NEUTRAL_ACTION, constant_action
from pipeline.contracts.spec import JobSpec
from pipeline.contracts.storage import StorageFatalError, open_storage
from workers import wham
from workers.actor.encode import auto_preview_scale
from workers.actor.endpoint import EndpointBackend, EndpointError, RolloutJob
from workers.actor.inputs import load_seed, make_actions
from workers.actor.ray_hooks import install_ray_hooks, setup_actor_logging
from workers.actor.replica import batch_size_for, load_replica
from workers.actor.writer import OutputWriter, WriteError

log = logging.getLogger("workers.actor.actor")
MAX_ERROR_CHARS = 500


@dataclass
class _Ready:
    """One rollout with its inputs loaded, waiting to be batched."""

    item: RolloutItem
    context_images: np.ndarray  # (T,3,H,W) uint8
    context_actions: np.ndarray  # (T,16) int64
    actions: np.ndarray | None  # (steps,16) int64 for world_model
    observations: np.ndarray | None  # (steps,3,H,W) uint8 for policy


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _per_row(values: Any, batch: int) -> np.ndarray:
    """A StepOutput signal as float32 (B,); NaN where the engine gave none."""
    if values is None:
        return np.full(batch, np.nan, dtype=np.float32)
    return np.asarray(values, dtype=np.float32).reshape(batch)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


class RolloutActor:
    def __init__(self, spec: JobSpec, *, worker: str = "local",
                 script: np.ndarray | None = None) -> None:
        """Load the replica and open the writer; `script` holds scripted actions (N,16)."""
        # In a Ray actor, metrics go to Ray and log lines carry run_id and worker (and unit
        # inside run_unit).
        install_ray_hooks()
        setup_actor_logging(run_id=spec.run.run_id, worker=worker)
        self.spec = spec
        self.worker = worker
        self.script = script
        m, s = spec.model, spec.rollouts.sampling
        self.sampling = wham.SamplingParams(temperature=s.temperature, top_k=s.top_k,
                                            top_p=s.top_p, greedy=s.greedy)
        self.engine = None
        if m.endpoint is not None:
            self.model = EndpointBackend(
                url=m.endpoint, api_key_env=m.api_key_env, max_concurrency=m.max_concurrency,
                timeout_s=m.timeout_s, max_attempts=m.max_attempts, backoff_s=m.backoff_s,
                sampling={"temperature": s.temperature, "top_k": 1 if s.greedy else s.top_k,
                          "top_p": s.top_p})
            self.batch_size = m.max_concurrency
        else:
            self.model = load_replica(checkpoint=m.checkpoint, preset=m.preset, device=m.device,
                                      dtype=m.dtype, seed=spec.run.seed,
                                      threads=spec.resources.cpus_per_actor,
                                      endpoint_url=m.endpoint_url, region=m.region)
            self.batch_size = batch_size_for(self.model, spec.resources.batch_size)
            self.engine = wham.RolloutEngine(self.model, max_batch=self.batch_size)
        o = spec.output
        preview_scale = (auto_preview_scale(*self.model.image_size)
                         if o.preview_scale == "auto" else o.preview_scale)
        self.storage = open_storage(o.root, endpoint_url=o.endpoint_url, region=o.region)
        self.writer = OutputWriter(
            self.storage, run_date=spec.run.run_date.isoformat(), run_id=spec.run.run_id,
            frames=o.frames, video=o.video, previews=o.previews, preview_scale=preview_scale,
            image_tokens=o.image_tokens, watermark=o.watermark, model_id=self.model.model_id,
            threads=o.writer_threads,
            tokens_per_image=self.model.tokens_per_image if o.image_tokens else None)
        self._compute = threading.Lock()

    def ready(self) -> dict[str, Any]:
        """Small facts for the driver and the run manifest (also a liveness probe)."""
        return {"worker": self.worker, "pid": os.getpid(), "model_id": self.model.model_id,
                "sha256": self.model.sha256, "batch_size": self.batch_size,
                "device": str(self.model.device), "dtype": str(self.model.dtype).split(".")[-1]}

    # ------------------------------------------------------------------ one unit

    def run_unit(self, unit: WorkUnit) -> UnitReceipt:
        with log_context(unit=unit.unit_id):
            return self._run_unit(unit)

    def _run_unit(self, unit: WorkUnit) -> UnitReceipt:
        adapted: Counter[str] = Counter()  # how its seeds were made to fit the model
        try:
            with self._compute:
                t0 = time.perf_counter()  # not counting the wait for the other unit
                ok, failed, errors = self._generate(unit, adapted)
                generate_s = time.perf_counter() - t0
            result = self.writer.finish_unit(unit.unit_id,
                                                plan_fingerprint=unit.plan_fingerprint)
        except BaseException:
            # Not committed: drop what was buffered so a retry starts clean.
            self.writer.abort_unit(unit.unit_id)
            raise
        steps = self.spec.rollouts.steps
        return UnitReceipt(
            unit_id=unit.unit_id, ok=ok, failed=failed, generated_frames=ok * steps,
            tokens=ok * steps * self.model.tokens_per_step, generate_seconds=generate_s,
            write_seconds=result.write_seconds, worker=self.worker,
            errors=errors, stored_frames=result.frames, adaptations=dict(adapted))

    def _generate(self, unit: WorkUnit, adapted: Counter[str]) -> tuple[int, int, list[str]]:
        ready: list[_Ready] = []
        errors: list[str] = []
        failed = 0
        by_seed: dict[str, list[RolloutItem]] = defaultdict(list)
        for item in unit.items:
            by_seed[item.seed_uri].append(item)
        for items in by_seed.values():
            started = _now()
            try:
                ready.extend(self._prepare(items, adapted))
            except Exception as exc:
                failed += self._fail(unit, items, exc, started=started, errors=errors)
        # Rows of one batch must share a context length; seeds may differ in it.
        by_len: dict[int, list[_Ready]] = defaultdict(list)
        for r in ready:
            by_len[len(r.context_images)].append(r)
        ok = 0
        for group in by_len.values():
            for start in range(0, len(group), self.batch_size):
                batch = group[start:start + self.batch_size]
                started = _now()
                t = time.perf_counter()
                try:
                    lost, quality = self._run_batch(unit, batch)
                except WriteError as exc:  # outputs failed, not rollouts: the unit fails
                    if isinstance(exc.__cause__, StorageFatalError):
                        raise exc.__cause__ from None  # as it is: the driver stops the run
                    raise
                except StorageFatalError:
                    raise
                except Exception as exc:
                    log.exception("unit %s: batch failed", unit.unit_id)
                    failed += self._fail(unit, [r.item for r in batch], exc, started=started,
                                         errors=errors)
                    continue
                seconds = time.perf_counter() - t
                for r in batch:
                    if r.item.rollout_id in lost:
                        failed += self._fail(unit, [r.item], lost[r.item.rollout_id],
                                             started=started, errors=errors)
                        continue
                    self.writer.finish_rollout(unit.unit_id, {**self._row(
                        r.item, status="ok", error=None, started=started,
                        context_steps=len(r.context_images), seconds=seconds),
                        **quality.get(r.item.rollout_id, {})})
                    ok += 1
        return ok, failed, errors

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
            out.append(_Ready(item=item, context_images=ctx_images, context_actions=ctx_actions,
                              actions=actions, observations=observations))
        return out

    def _run_batch(self, unit: WorkUnit,
                   batch: list[_Ready]) -> tuple[dict[str, Exception], dict[str, dict[str, Any]]]:
        """Roll the batch out and hand every step to the writer. Returns the rollouts that
        failed on their own (endpoint only) and each rollout's quality aggregates (engine
        only: an endpoint sends no probabilities), both by rollout id."""
        if self.engine is None:
            return self._run_endpoint_batch(unit, batch), {}
        ctx_images = np.stack([r.context_images for r in batch])  # (B,T,3,H,W)
        ctx_actions = np.stack([r.context_actions for r in batch])  # (B,T,16)
        # Encoded once here, so context steps get their tokens and the engine skips encoding.
        ctx_tokens = self.model.encode_images(ctx_images)  # (B,T,n)
        mode = self.spec.rollouts.mode
        actions = np.stack([r.actions for r in batch]) if mode == "world_model" else None
        observations = np.stack([r.observations for r in batch]) if mode == "policy" else None
        t_ctx = ctx_images.shape[1]
        ctx_tokens_np = ctx_tokens.cpu().numpy()
        for b, r in enumerate(batch):  # context steps are rows too: every rollout is whole
            for t in range(t_ctx):
                self.writer.add_step(unit.unit_id, r.item.rollout_id, step=t,
                                     image=r.context_images[t], action=r.context_actions[t],
                                     generated=False, action_source="seed",
                                     image_tokens=ctx_tokens_np[b, t])
        o = self.spec.output
        outputs = self.engine.rollout(
            context_tokens=ctx_tokens, context_actions=ctx_actions,
            steps=self.spec.rollouts.steps, mode=mode, actions=actions,
            observations=observations, sampling=self.sampling,
            seeds=[r.item.rng_seed for r in batch],
            # frames: none stores no pixels: skip the decoder unless previews or videos want them
            decode_images=o.frames != "none" or o.previews or o.video)
        signals = {name: [] for name in STEP_QUALITY_COLUMNS}  # name -> per step [B]
        for out in outputs:
            images, step_actions = out.images, out.actions.numpy()  # (B,3,H,W), (B,16)
            tokens = out.image_tokens.numpy()
            step = {name: _per_row(getattr(out, name), len(batch))
                    for name in STEP_QUALITY_COLUMNS}
            for name, values in step.items():
                signals[name].append(values)
            for b, r in enumerate(batch):
                self.writer.add_step(
                    unit.unit_id, r.item.rollout_id, step=t_ctx + out.index,
                    image=None if images is None else images[b],
                    action=step_actions[b], generated=True, action_source=out.action_source,
                    image_tokens=tokens[b], quality={k: v[b] for k, v in step.items()})
        per_step = {k: np.stack(v, axis=1) if v else np.zeros((len(batch), 0), np.float32)
                    for k, v in signals.items()}  # name -> (B, steps)
        return {}, {r.item.rollout_id: rollout_quality(
            {k: v[b] for k, v in per_step.items()}, first_step=t_ctx,
            tokens_per_image=self.model.tokens_per_image,
            image_vocab_size=self.model.image_vocab_size) for b, r in enumerate(batch)}

    def _run_endpoint_batch(self, unit: WorkUnit, batch: list[_Ready]) -> dict[str, Exception]:
        jobs = [RolloutJob(context_images=r.context_images, context_actions=r.context_actions,
                           actions=r.actions, rng_seed=r.item.rng_seed) for r in batch]
        lost: dict[str, Exception] = {}
        for b, outcome in self.model.rollouts(jobs, steps=self.spec.rollouts.steps,
                                              mode=self.spec.rollouts.mode):
            r = batch[b]
            if isinstance(outcome, EndpointError):
                lost[r.item.rollout_id] = outcome
                continue
            t_ctx = len(r.context_images)
            for t in range(t_ctx):
                self.writer.add_step(unit.unit_id, r.item.rollout_id, step=t,
                                     image=r.context_images[t], action=r.context_actions[t],
                                     generated=False, action_source="seed")
            keep_tokens = self.spec.output.image_tokens
            for k, step in enumerate(outcome):
                self.writer.add_step(
                    unit.unit_id, r.item.rollout_id, step=t_ctx + k, image=step.image,
                    action=step.action, generated=True, action_source=step.source,
                    image_tokens=step.tokens if keep_tokens else None)
        return lost

    def _fail(self, unit: WorkUnit, items: list[RolloutItem], exc: BaseException, *,
              started: dt.datetime, errors: list[str]) -> int:
        message = _short(exc)
        seeds = sorted({item.seed_id for item in items})
        errors.append(f"seed {seeds[0]}: {message}" if len(seeds) == 1
                      else f"{len(items)} rollouts of seeds {', '.join(seeds)}: {message}")
        for item in items:
            row = self._row(item, status="failed", error=message, started=started,
                            context_steps=0, seconds=0.0)
            # Not a column: the commit marker counts these, and a rerun redoes their unit.
            row["retryable"] = bool(getattr(exc, "retryable", False))
            self.writer.finish_rollout(unit.unit_id, row)
        return len(items)

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
            "top_p": r.sampling.top_p, "greedy": r.sampling.greedy, "rng_seed": item.rng_seed,
            "model_id": self.model.model_id, "model_sha256": self.model.sha256,
            "status": status, "error": error, "worker": self.worker, "started_at": started,
            "finished_at": _now(), "generate_seconds": seconds,
        }

    def close(self) -> None:
        self.writer.close()
        if self.engine is None:
            self.model.close()
