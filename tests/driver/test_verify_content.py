"""Verified means the bytes: a changed byte, a swapped part or a part from another run is
caught by `wham-batch verify` and by the driver's check before `_SUCCESS` (the same code),
on a local folder and on S3, and refused by the readers; rerunning the run repairs it."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import support.units
from support.units import commit_unit

from pipeline.cli import main
from pipeline.contracts import layout
from pipeline.contracts.checksums import sum_of, with_s3_checksum
from pipeline.contracts.parts import DamagedPart
from pipeline.contracts.plan import UnitReceipt, WorkUnit, plan_for_spec
from pipeline.contracts.spec import JobSpec, spec_from_data
from pipeline.contracts.storage import MULTIPART_THRESHOLD, open_storage
from pipeline.dataset.index import Source, select_shards
from pipeline.dataset.reader import UnitReader
from pipeline.driver import run_job
from pipeline.driver.discovery import discover_seeds
from pipeline.driver.run_state import read_markers, run_fingerprint
from pipeline.driver.verify import check_units, verify_run
from pipeline.driver.verify_unit import Objects
from pipeline.query import open_table

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(support.units)  # Ray's workers cannot import tests/

DEMO = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"
DATE = "2026-01-02"
RUN = "audit"


def job(root: str, *, run_id: str = RUN, frames: str = "parquet", per_unit: int = 4) -> JobSpec:
    """6 demo seeds x 2 rollouts of 2 steps, in units of `per_unit` rollouts."""
    return spec_from_data({
        "run": {"name": "v", "run_id": run_id, "run_date": DATE},
        "model": {"preset": "tiny"}, "seeds": {"source": str(DEMO)},
        "rollouts": {"steps": 2, "per_seed": 2},
        "resources": {"actors": 1, "cpus_per_actor": 0.1, "rollouts_per_unit": per_unit},
        "output": {"root": root, "frames": frames, "previews": False}})


def write_run(spec: JobSpec) -> None:
    """The run committed as the actors do (real writer, no model), with its manifest."""
    storage = open_storage(spec.output.root)
    units = plan_for_spec(spec, discover_seeds(str(DEMO)))
    fingerprint = run_fingerprint(spec, units)
    for unit in units:
        commit_unit(storage, spec, dataclasses.replace(unit, plan_fingerprint=fingerprint),
                    frames=spec.output.frames)
    storage.put_bytes(layout.manifest_key(DATE, spec.run.run_id), json.dumps(
        {"plan_fingerprint": fingerprint, "counts": {"units_total": len(units)}}).encode())


@dataclasses.dataclass(frozen=True)
class Target:
    """The unit a case damages, in its run on its storage."""

    storage: object
    spec: JobSpec
    unit: int

    def key(self, table: str, unit: int | None = None) -> str:
        uid = layout.unit_id_for(self.unit if unit is None else unit)
        return layout.part_key(table, DATE, self.spec.run.run_id, uid)


def rewrite(storage, key: str, edit: Callable[[pa.Table], pa.Table]) -> None:  # noqa: ANN001
    """The part with `edit` applied, written as the writer writes (zstd, its metadata)."""
    table = pq.read_table(pa.BufferReader(storage.get_bytes(key)))
    sink = pa.BufferOutputStream()
    pq.write_table(edit(table), sink, compression="zstd")
    storage.put_bytes(key, sink.getvalue().to_pybytes())


def flip_byte(storage, key: str, *, at: int) -> None:  # noqa: ANN001
    """One byte of the object changed, its size kept."""
    data = bytearray(storage.get_bytes(key))
    data[at] ^= 0x01
    storage.put_bytes(key, bytes(data))


def _changed_png(t: Target) -> None:
    rows = pq.read_table(pa.BufferReader(t.storage.get_bytes(t.key(layout.STEPS_TABLE))))
    key = rows.column("frame_key")[1].as_py()
    flip_byte(t.storage, key, at=len(t.storage.get_bytes(key)) // 2)


def _changed_token(t: Target) -> None:
    def edit(table: pa.Table) -> pa.Table:
        tokens = table.column("image_tokens").to_pylist()
        tokens[1][2] += 1
        i = table.schema.get_field_index("image_tokens")
        return table.set_column(i, table.schema.field(i),
                                pa.array(tokens, table.schema.field(i).type))
    rewrite(t.storage, t.key(layout.STEPS_TABLE), edit)


def _status_5k(t: Target) -> None:
    def edit(table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index("status")
        status = pc.replace_substring(table.column("status"), "ok", "5k")
        return table.set_column(i, table.schema.field(i), status)
    rewrite(t.storage, t.key(layout.ROLLOUTS_TABLE), edit)


def _broken_png_page(t: Target) -> None:
    """A byte inside the frames part's `png` column (stored uncompressed, and a column
    the check of rows never reads): the footer and the other columns still read."""
    key = t.key(layout.FRAMES_TABLE)
    data = t.storage.get_bytes(key)
    flip_byte(t.storage, key, at=data.index(b"IDAT") + 8)
    assert pq.ParquetFile(pa.BufferReader(t.storage.get_bytes(key))).metadata.num_rows > 0


def _swapped(table: str) -> Callable[[Target], None]:
    def swap(t: Target) -> None:
        t.storage.put_bytes(t.key(table), t.storage.get_bytes(t.key(table, t.unit + 1)))
    return swap


def _foreign(table: str) -> Callable[[Target], None]:
    def copy(t: Target) -> None:
        other = job(t.spec.output.root, run_id="other", frames=t.spec.output.frames,
                    per_unit=t.spec.resources.rollouts_per_unit)
        write_run(other)
        foreign = Target(t.storage, other, t.unit)
        t.storage.put_bytes(t.key(table), t.storage.get_bytes(foreign.key(table)))
    return copy


#: case -> (frames mode, damage, what the check says)
CASES = {
    "changed_png": ("png", _changed_png, "is not what its commit marker records"),
    "changed_image_token": ("none", _changed_token, "steps part"),
    "status_ok_to_5k": ("parquet", _status_5k, "rollouts part"),
    "broken_page_in_png_column": ("parquet", _broken_png_page, "frames part"),
    "steps_part_of_next_unit": ("parquet", _swapped(layout.STEPS_TABLE), "does not belong"),
    "rollouts_part_of_next_unit": ("parquet", _swapped(layout.ROLLOUTS_TABLE),
                                   "does not belong"),
    "steps_part_of_another_run": ("none", _foreign(layout.STEPS_TABLE), "run other"),
    "rollouts_part_of_another_run": ("parquet", _foreign(layout.ROLLOUTS_TABLE), "run other"),
}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:  # noqa: ANN001
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket")


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_and_the_check_before_success_catch_it(root: str, case: str, capsys) -> None:
    frames, damage, said = CASES[case]
    spec = job(root, frames=frames)
    write_run(spec)
    storage = open_storage(root)
    assert verify_run(storage, run_date=DATE, run_id=RUN).ok
    damage(Target(storage, spec, 0))
    check = verify_run(storage, run_date=DATE, run_id=RUN)
    assert list(check.bad_units) == ["u000000"], check.lines()
    problems = " | ".join(check.bad_units["u000000"])
    assert said in problems
    assert "is not what its commit marker records" in problems
    markers = read_markers(storage, run_date=DATE, run_id=RUN).good
    before_success = check_units(storage, run_date=DATE, run_id=RUN, markers=markers)
    assert before_success.bad_units == check.bad_units
    assert main(["verify", root, "--run-id", RUN]) == 1
    assert "unit u000000:" in capsys.readouterr().err


def test_an_object_replaced_with_its_own_s3_checksum_is_caught_by_head(
        s3_bucket: str, monkeypatch, capsys) -> None:
    """On S3 the default check compares the checksum S3 keeps with the marker, without a
    download; `--deep` downloads and hashes every object."""
    write_run(job(s3_bucket))
    storage = open_storage(s3_bucket)
    hashed: list[str] = []
    real_hash = Objects.hash
    monkeypatch.setattr(Objects, "hash", lambda self, key: hashed.append(key) or
                        real_hash(self, key))
    assert verify_run(storage, run_date=DATE, run_id=RUN).ok and hashed == []
    assert main(["verify", s3_bucket, "--run-id", RUN, "--deep"]) == 0
    assert "(every object read and hashed)" in capsys.readouterr().out
    assert sorted(hashed) == [layout.frames_part_key(DATE, RUN, f"u00000{i}") for i in range(3)]
    hashed.clear()
    key = layout.frames_part_key(DATE, RUN, "u000002")
    data = bytearray(storage.get_bytes(key))
    data[data.index(b"IDAT") + 8] ^= 0x01
    storage.put_with_checksum(key, bytes(data))  # S3 keeps the new content's SHA-256
    check = verify_run(storage, run_date=DATE, run_id=RUN)
    assert list(check.bad_units) == ["u000002"] and hashed == [key]  # settled by hashing
    assert "is not what its commit marker records" in check.bad_units["u000002"][0]


def test_multipart_uploads_compare_by_their_composite_checksum(s3_bucket: str,
                                                               monkeypatch) -> None:
    storage = open_storage(s3_bucket)
    data = bytes(range(256)) * ((MULTIPART_THRESHOLD + 2**20) // 256)
    reported = storage.put_with_checksum("big/part.parquet", data)
    written = with_s3_checksum(sum_of(data), reported)
    assert written.s3 is not None and written.s3 != written.sha256  # a composite
    hashed: list[str] = []
    monkeypatch.setattr(Objects, "hash", lambda self, key: hashed.append(key))
    assert Objects(storage).problem("big/part.parquet", written, what="part") is None
    assert hashed == []  # compared by HEAD: no download
    other = bytearray(data)
    other[-1] ^= 0x01
    storage.put_with_checksum("big/part.parquet", bytes(other))
    monkeypatch.undo()
    wrong = Objects(storage).problem("big/part.parquet", written, what="part")
    assert wrong is not None and "is not what its commit marker records" in wrong


def test_readers_refuse_a_part_standing_in_another_units_place(tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    spec = job(root, frames="none")
    write_run(spec)
    storage = open_storage(root)
    _swapped(layout.STEPS_TABLE)(Target(storage, spec, 0))
    shown = storage.key_uri(layout.steps_part_key(DATE, RUN, "u000000"))
    with pytest.raises(DamagedPart, match=f"table part {shown} does not belong there: it says "
                       "it is the steps part of unit u000001"):
        open_table(root, layout.STEPS_TABLE).to_table()
    shard = next(s for s in select_shards(Source(root)) if s.unit_id == "u000000")
    with pytest.raises(DamagedPart, match=f"table part {shown} does not belong there"):
        UnitReader(Source(root), frames=None).read(shard)
    assert main(["query", root, "--table", "rollouts", "--limit", "1"]) == 0


class CommittingActor:
    """Commits each unit like the real actor (real writer, no model), in the spec's frame
    mode; logs which units ran."""

    def __init__(self, spec: JobSpec, *, worker: str, script=None) -> None:  # noqa: ANN001
        self.spec, self.worker = spec, worker
        self.storage = open_storage(spec.output.root)

    def ready(self) -> dict:
        return {"model_id": "stub", "sha256": "0" * 64, "batch_size": 4}

    def run_unit(self, unit: WorkUnit) -> UnitReceipt:
        commit_unit(self.storage, self.spec, unit, frames=self.spec.output.frames)
        self.storage.put_bytes(f"ran/{unit.unit_id}", b"")
        return UnitReceipt(unit_id=unit.unit_id, ok=unit.num_rollouts, failed=0,
                           generated_frames=2 * unit.num_rollouts, tokens=0, generate_seconds=0.0,
                           write_seconds=0.0, worker=self.worker)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("frames", ["png", "parquet", "none"])
def test_rerunning_the_run_repairs_every_case_before_success(root: str, frames: str) -> None:
    """One unit of one rollout per case (the swaps take the next unit's part), damaged
    under `_SUCCESS`; the rerun finds them before `_SUCCESS` and redoes those units only."""
    spec = job(root, frames=frames, per_unit=1)
    storage = open_storage(root)
    assert run_job(spec, actor_cls=CommittingActor, progress=False).ok
    success = layout.success_key(DATE, RUN)
    cases = [damage for mode, damage, _ in CASES.values() if mode == frames]
    damaged = [layout.unit_id_for(2 * i) for i in range(len(cases))]
    for i, damage in enumerate(cases):
        damage(Target(storage, spec, 2 * i))
    storage.delete_prefix("ran/")
    check = verify_run(storage, run_date=DATE, run_id=RUN)
    assert storage.exists(success) and sorted(check.bad_units) == damaged
    summary = run_job(spec, actor_cls=CommittingActor, progress=False)
    assert summary.ok and summary.units_redone == len(damaged), summary.problems
    assert sorted(k.split("/")[1] for k in storage.list_keys("ran/")) == damaged
    assert storage.exists(success)
    assert verify_run(storage, run_date=DATE, run_id=RUN, deep=True).ok
