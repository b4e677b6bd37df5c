"""Commit a work unit the way the actor does, with the real writer but without a model:
one seed step plus `rollouts.steps` generated steps per rollout (neutral actions), real
Parquet parts and a real commit marker; frames stored as `frames` says (`none`: each row
holds image tokens instead, as a tokens-only run's rows do). Stub actors in driver tests use
it so a run's outputs pass the driver's check against storage."""

from __future__ import annotations

import datetime as dt

import numpy as np

from pipeline.contracts.plan import WorkUnit
from pipeline.contracts.sources import NEUTRAL_ACTION
from pipeline.contracts.spec import JobSpec
from pipeline.contracts.storage import Storage
from workers.actor.writer import OutputWriter, UnitWriteResult, WriterSettings

FRAME = np.zeros((3, 8, 8), dtype=np.uint8)
TOKENS = np.arange(4, dtype=np.int64)


def rollout_row(spec: JobSpec, item, *, worker: str = "stub") -> dict:  # noqa: ANN001
    now = dt.datetime.now(dt.UTC)
    s = spec.rollouts.sampling
    return {
        "rollout_id": item.rollout_id, "seed_id": item.seed_id, "seed_uri": item.seed_uri,
        "rollout_index": item.rollout_index, "mode": spec.rollouts.mode,
        "action_policy": "random", "context_steps": 1, "generated_steps": spec.rollouts.steps,
        "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "greedy": s.greedy,
        "rng_seed": item.rng_seed, "model_id": "stub", "model_sha256": "0" * 64,
        "status": "ok", "error": None, "worker": worker, "started_at": now,
        "finished_at": now, "generate_seconds": 0.0,
    }


def commit_unit(storage: Storage, spec: JobSpec, unit: WorkUnit, *,
                frames: str = "none") -> UnitWriteResult:
    pixels = frames != "none"
    writer = OutputWriter(storage, WriterSettings(
        run_date=spec.run.run_date, run_id=spec.run.run_id, frame_mode=frames,
        image_tokens=not pixels, model_id="stub",
        tokens_per_image=None if pixels else len(TOKENS), threads=1))
    with writer:
        for item in unit.items:
            for step in range(spec.rollouts.steps + 1):
                writer.add_step(unit.unit_id, item.rollout_id, step=step,
                                image=FRAME if pixels else None, action=NEUTRAL_ACTION,
                                image_tokens=None if pixels else TOKENS,
                                generated=step > 0,
                                action_source="given" if step else "seed")
            writer.finish_rollout(unit.unit_id, rollout_row(spec, item))
        return writer.finish_unit(unit.unit_id, plan_fingerprint=unit.plan_fingerprint)
