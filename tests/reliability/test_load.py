"""Load: thousands of rollouts through the real driver, actors and writer to loopback S3.

Only the engine is a stub (it returns the seed frame and counting tokens instead of
sampling), so what is measured is orchestration: planning, fan-out, seed loading, PNG and
Parquet writing, commits. The driver's RSS is sampled throughout and must stay flat, and
the units in flight (as the driver reports them to its metrics) never exceed
actors x units_in_flight.

CI runs WHAM_LOAD_SEEDS=300 (the default); docs/reliability.md has the 2,000-seed run:
    WHAM_LOAD_SEEDS=2000 .venv/bin/python -m pytest -q tests/test_load.py
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import ray
from PIL import Image
from support.faultproxy import record_figures

from pipeline.contracts.layout import commits_prefix
from pipeline.contracts.metrics import Metrics
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.contracts.storage import open_storage
from pipeline.driver import run_job
from pipeline.driver.verify import verify_run
from workers.actor.actor import RolloutActor

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
SEEDS = int(os.environ.get("WHAM_LOAD_SEEDS", "300"))
PER_SEED = 2
ACTORS, IN_FLIGHT = 2, 2
RSS_GROWTH_LIMIT = 64 * 2**20  # after warm-up; a leak per unit or rollout would exceed it


class _StubEngine:
    """The engine's interface without the model: frames are grey."""

    def __init__(self, model: object) -> None:
        self.tokens_per_image = model.tokens_per_image
        self.image_size = tuple(model.image_size)

    def rollout(self, *, context_tokens: object, steps: int, seeds: list[int],
                actions: np.ndarray | None = None, **_: object):  # noqa: ANN201
        import torch

        from workers.wham.engine import StepOutput

        batch = len(seeds)
        base = torch.tensor(seeds, dtype=torch.int64).remainder(64)[:, None]  # (B,1)
        for i in range(steps):
            tokens = (base + i + torch.arange(self.tokens_per_image)).remainder(64)  # (B,n)
            yield StepOutput(index=i, image_tokens=tokens,
                             images=np.full((batch, 3, *self.image_size), 128, np.uint8),
                             actions=torch.as_tensor(actions[:, i]).reshape(batch, 16),
                             action_source="given")


class StubEngineActor(RolloutActor):
    def __init__(self, spec: JobSpec, *, worker: str, script: object = None) -> None:
        super().__init__(spec, worker=worker, script=script)
        self.model.engine = _StubEngine(self.model)


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value % 256, (value * 7) % 256, 40)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_thousands_of_rollouts_keep_driver_memory_flat(
        tmp_path: Path, s3_bucket: str, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for i in range(SEEDS):
        (seeds / f"seed_{i:05d}.png").write_bytes(_png(i))
    spec = spec_from_data({
        "run": {"name": "load", "run_id": "load", "run_date": "2026-10-11"},
        "model": {"preset": "tiny", "device": "cpu", "dtype": "float32"},
        "seeds": {"source": str(seeds)},
        "rollouts": {"steps": 1, "per_seed": PER_SEED},
        "resources": {"actors": ACTORS, "cpus_per_actor": 0.5, "batch_size": 16,
                      "rollouts_per_unit": 16, "units_in_flight": IN_FLIGHT},
        "output": {"root": s3_bucket, "previews": False, "writer_threads": 4},
    })
    in_flight: list[int] = []
    real_set = Metrics.set_units_in_flight

    def spy(self: object, count: int) -> None:
        in_flight.append(count)
        real_set(self, count)

    monkeypatch.setattr(Metrics, "set_units_in_flight", spy)
    samples: list[tuple[int, int]] = []  # (units done, rss)
    done = {"units": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append((done["units"], _rss()))

    def on_event(event: object) -> None:
        if event.kind == "unit_committed":
            done["units"] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        summary = run_job(spec, actor_cls=StubEngineActor, progress=False,
                                        on_event=on_event)
    finally:
        stop.set()
        sampler.join(timeout=10)
    wall = time.perf_counter() - t0
    rollouts = SEEDS * PER_SEED
    units = -(-rollouts // 16)
    assert summary.complete and (summary.rollouts_ok, summary.rollouts_failed) == (rollouts, 0)
    assert done["units"] == units
    assert max(in_flight) <= ACTORS * IN_FLIGHT and max(in_flight) >= 2
    storage = open_storage(s3_bucket)
    assert len(list(storage.list_keys(commits_prefix("2026-10-11", "load")))) == units
    fs, base = storage.arrow_fs()
    steps = ds.dataset(f"{base}/steps", filesystem=fs, partitioning="hive").to_table(
        columns=["rollout_id", "step"])
    assert steps.num_rows == rollouts * 2
    assert len(set(zip(*steps.to_pydict().values(), strict=True))) == rollouts * 2
    # flat: after the first tenth of the units, RSS grows by less than the limit
    warm = [rss for units_done, rss in samples if units_done >= units // 10]
    assert warm, "no RSS samples after warm-up"
    growth = max(warm) - warm[0]
    assert growth < RSS_GROWTH_LIMIT, f"driver RSS grew {growth / 2**20:.0f} MiB"
    # the check the driver ran before _SUCCESS, once more on its own, timed
    t0 = time.perf_counter()
    check = verify_run(storage, run_date="2026-10-11", run_id="load")
    verify_s = time.perf_counter() - t0
    assert check.ok and check.units_checked == units and check.rows == rollouts * 2
    record_figures("load", seeds=SEEDS, rollouts=rollouts, units=units, rows=check.rows,
                   rows_expected=rollouts * 2,
                   verify_s=round(verify_s, 2),
                   wall_s=round(wall, 1), rollouts_per_s=round(rollouts / wall, 1),
                   max_units_in_flight=max(in_flight), in_flight_limit=ACTORS * IN_FLIGHT,
                   rss_peak_mib=round(max(r for _, r in samples) / 2**20),
                   rss_growth_after_warmup_mib=round(growth / 2**20, 1))
