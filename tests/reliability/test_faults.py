"""S3 faults on the wire: the storage layer and a whole pipeline run behind a fault proxy.

The proxy (tests/faultproxy.py) sits between boto3 and the moto server and injects 500s,
503 SlowDown, connections reset mid-body, delays and failed multipart parts on a seeded
schedule. What lands in the bucket is always checked straight on the moto server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.faultproxy import FaultProxy, record_figures

from pipeline.contracts import layout
from pipeline.contracts.parts import check_part
from pipeline.contracts.spec import spec_from_data
from pipeline.contracts.storage import MULTIPART_THRESHOLD, open_storage
from pipeline.driver import run_job
from workers.actor.actor import RolloutActor

DEMO = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"
DATE = "2026-03-04"
PIPELINE_RATES = {"error500": 0.08, "slowdown": 0.03, "reset": 0.1, "delay": 0.05}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", ["error500", "slowdown", "reset", "delay"])
def test_storage_operations_survive_each_fault_kind(s3_server: str, s3_bucket: str,
                                                    kind: str) -> None:
    rate = 0.15 if kind == "slowdown" else 0.4  # SlowDown costs a client backoff each
    direct = open_storage(s3_bucket)
    with FaultProxy(s3_server, rates={kind: rate}, seed=7) as proxy:
        store = open_storage(s3_bucket, endpoint_url=proxy.url)
        blobs = {f"obj/{i:02d}.bin": os.urandom(3000 + i) for i in range(12)}
        for key, data in blobs.items():
            store.put_bytes(key, data)
            assert store.get_bytes(key) == data
            assert store.exists(key)
        assert list(store.list_keys("obj/")) == sorted(blobs)
        assert store.create_if_absent("marker.json", b"{}") is True
        assert store.create_if_absent("marker.json", b"{}") is False
    assert proxy.counts[kind] > 0
    intact = sum(_digest(direct.get_bytes(k)) == _digest(v) for k, v in blobs.items()) + (
        direct.get_bytes("marker.json") == b"{}")
    record_figures("storage_faults", requests=proxy.requests, faults=dict(proxy.counts),
                   objects=len(blobs) + 1, intact=intact)
    assert intact == len(blobs) + 1


@pytest.mark.slow
def test_multipart_upload_survives_part_failures_and_resets(s3_server: str,
                                                           s3_bucket: str) -> None:
    data = os.urandom(MULTIPART_THRESHOLD + 3 * 1024 * 1024)  # 3 parts of 8 MiB max
    direct = open_storage(s3_bucket)
    # every part fails twice before it gets through
    with FaultProxy(s3_server, rates={"part_fail": 1.0}, max_consecutive=2) as proxy:
        open_storage(s3_bucket, endpoint_url=proxy.url).put_bytes("big.bin", data)
    assert proxy.counts["part_fail"] == 3 * 2
    assert _digest(direct.get_bytes("big.bin")) == _digest(data)
    # reading the large object back through connections cut mid-body
    with FaultProxy(s3_server, rates={"reset": 1.0}, max_consecutive=2) as proxy:
        got = open_storage(s3_bucket, endpoint_url=proxy.url).get_bytes("big.bin")
    assert proxy.counts["reset"] == 2 and _digest(got) == _digest(data)
    uploads = direct._s3.list_multipart_uploads(Bucket=direct.bucket).get("Uploads", [])
    assert uploads == []  # no multipart upload left dangling
    record_figures("multipart_faults", faults={"part_fail": 6, "reset": 2}, objects=1,
                   intact=int(_digest(direct.get_bytes("big.bin")) == _digest(data)))


def _job(tmp_path: Path, root: str, endpoint: str, run_id: str) -> dict:
    return {
        "run": {"name": "faults", "run_id": run_id, "run_date": DATE, "seed": 5},
        "model": {"preset": "tiny", "device": "cpu", "dtype": "float32"},
        "seeds": {"source": str(tmp_path / "seeds")},
        "rollouts": {"steps": 3, "per_seed": 2},
        "resources": {"actors": 2, "cpus_per_actor": 0.5, "batch_size": 2,
                      "rollouts_per_unit": 2},
        # One PNG object per frame: many small requests for the proxy to break.
        "output": {"root": root, "endpoint_url": endpoint, "previews": True, "frames": "png"},
    }


def _snapshot(root: str) -> dict:
    """Every object of a run as read on the server, checked for completeness on the way."""
    store = open_storage(root)
    keys = sorted(store.list_keys())
    steps_rows, rollout_rows, frames = [], [], {}
    for key in keys:
        data = store.get_bytes(key)
        if key.endswith(".png"):
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # a truncated PNG fails here
            frames[key] = _digest(data)
        elif key.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            if key.startswith(layout.STEPS_TABLE + "/"):
                assert table.schema.equals(layout.STEPS_SCHEMA), key
                check_part(key, table.schema.metadata)  # its run's, its unit's part
                steps_rows += table.to_pylist()
            else:
                assert table.schema.equals(layout.ROLLOUTS_SCHEMA), key
                check_part(key, table.schema.metadata)
                rollout_rows += [(r["rollout_id"], r["status"], r["rng_seed"],
                                  r["generated_steps"]) for r in table.to_pylist()]
        elif key.endswith(".gif"):
            with Image.open(io.BytesIO(data)) as image:
                assert image.n_frames == 4
    step_ids = [(r["rollout_id"], r["step"]) for r in steps_rows]
    assert len(step_ids) == len(set(step_ids)), "duplicate step rows"
    return {"keys": keys, "frames": frames,
            "steps": sorted(steps_rows, key=lambda r: (r["rollout_id"], r["step"])),
            "rollouts": sorted(rollout_rows)}


@pytest.mark.slow
def test_pipeline_run_through_faults_matches_a_clean_run(
        tmp_path: Path, s3_server: str, request: pytest.FixtureRequest, ray_local: None) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for i, picture in enumerate(sorted(DEMO.glob("*.png"))[:6]):
        (seeds / f"seed_{i}.png").write_bytes(picture.read_bytes())
    runs = {}
    for name, rates in (("clean", {}), ("faulty", PIPELINE_RATES)):
        bucket = request.getfixturevalue("s3_bucket") if name == "clean" else _new_bucket()
        with FaultProxy(s3_server, rates=rates, seed=1, max_consecutive=1) as proxy:
            spec = spec_from_data(_job(tmp_path, bucket, proxy.url, "faults"))
            t0 = time.perf_counter()
            summary = run_job(spec, actor_cls=RolloutActor, progress=False)
            wall = time.perf_counter() - t0
        assert summary.complete and summary.ok
        assert (summary.rollouts_ok, summary.rollouts_failed) == (12, 0)
        store = open_storage(bucket)
        assert store.exists(layout.success_key(DATE, spec.run.run_id))
        manifest = json.loads(store.get_bytes(layout.manifest_key(DATE, spec.run.run_id)))
        assert manifest["status"] == "complete"
        runs[name] = {"snapshot": _snapshot(bucket), "wall": wall,
                      "counts": dict(proxy.counts), "requests": proxy.requests}
    clean, faulty = runs["clean"], runs["faulty"]
    injected = {k: v for k, v in faulty["counts"].items() if k != "delay"}
    assert sum(injected.values()) >= 10, faulty["counts"]
    assert faulty["snapshot"]["keys"] == clean["snapshot"]["keys"]
    assert faulty["snapshot"]["frames"] == clean["snapshot"]["frames"]
    assert faulty["snapshot"]["steps"] == clean["snapshot"]["steps"]
    assert faulty["snapshot"]["rollouts"] == clean["snapshot"]["rollouts"]
    assert len(clean["snapshot"]["steps"]) == 12 * 4
    same = {k for k in clean["snapshot"]["frames"]
            if faulty["snapshot"]["frames"].get(k) == clean["snapshot"]["frames"][k]}
    record_figures("pipeline_faults", requests=faulty["requests"], faults=faulty["counts"],
                   objects=len(clean["snapshot"]["keys"]),
                   keys_present=len(set(clean["snapshot"]["keys"])
                                    & set(faulty["snapshot"]["keys"])),
                   frames=len(clean["snapshot"]["frames"]), identical_frames=len(same),
                   rows_lost=sum(r not in faulty["snapshot"]["steps"]
                                 for r in clean["snapshot"]["steps"]),
                   clean_wall_s=round(clean["wall"], 2), faulty_wall_s=round(faulty["wall"], 2),
                   slowdown=round(faulty["wall"] / clean["wall"], 2))


def _new_bucket() -> str:
    import uuid

    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/prefix"
