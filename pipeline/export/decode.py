"""`wham-batch decode`: frames for a run stored with `output.frames: none`, decoded from its
image tokens by the model that wrote it.

The frames go where a `frames: parquet` run keeps them (one frames part per unit, the
default) or one PNG per frame, under the same keys, in the run's own root or another one.
They are the PNGs the writer would have stored: provenance text, and the watermark on
generated frames when the run had it on. Once a unit's frames part exists, the loader
reads it instead of decoding again. Names are deterministic, so rerunning overwrites.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.parts import part_metadata
from pipeline.contracts.storage import open_storage
from pipeline.dataset.index import Source, select_shards
from pipeline.dataset.reader import UnitReader
from pipeline.driver.run_state import read_json

DECODE_FORMATS = ("parquet", "png")


@dataclass(frozen=True, slots=True)
class DecodeReport:
    units: int
    frames: int
    objects: int
    out: str


def decode_run(root: str, *, run_id: str, out: str | None = None, fmt: str = "parquet",
               decoder: str | None = None, endpoint_url: str | None = None,
               region: str | None = None) -> DecodeReport:
    """Decode every committed ok rollout of `run_id` and store its frames under `out`
    (default: `root`). UserError if the run stored frames already or has no tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt not in DECODE_FORMATS:
        raise UserError(f"--format must be one of {', '.join(DECODE_FORMATS)}, got {fmt!r}")
    source = Source(root, endpoint_url=endpoint_url, region=region)
    shards = select_shards(source, run_id=run_id)
    if not shards:
        raise UserError(f"no committed rollouts of run {run_id!r} under {root}")
    reader = UnitReader(source, frames=None, decoder=decoder)

    @functools.cache
    def plan(run_date: str, run_id: str) -> str:  # the parts say which plan they belong to
        manifest = read_json(reader.storage, layout.manifest_key(run_date, run_id)) or {}
        return str(manifest.get("plan_fingerprint") or "")

    target = open_storage(out or root, endpoint_url=endpoint_url, region=region)
    frames = objects = 0
    for shard in shards:
        rollouts = reader.read(shard)
        if any(k is not None for r in rollouts for k in r.steps.column("frame_key").to_pylist()):
            raise UserError(f"run {run_id} stored its frames already (output.frames is not "
                            "none); read them with the loader or `wham-batch query`")
        rows = [(r.rollout_id, step, png) for r in rollouts
                for step, png in zip(r.steps.column("step").to_pylist(),
                                     reader.decode(shard, r, png=True), strict=True)]
        frames += len(rows)
        if fmt == "png":
            for rollout_id, step, png in rows:
                key = layout.frame_key(shard.run_date, shard.run_id, rollout_id, step)
                target.put_bytes(key, png, content_type="image/png")
            objects += len(rows)
            continue
        table = pa.Table.from_arrays(
            [pa.array([r[0] for r in rows], pa.string()), pa.array([r[1] for r in rows],
             pa.int32()), pa.array([r[2] for r in rows], pa.binary())],
            schema=layout.FRAMES_SCHEMA.with_metadata(part_metadata(
                layout.FRAMES_TABLE, run_date=shard.run_date, run_id=shard.run_id,
                unit_id=shard.unit_id, plan_fingerprint=plan(shard.run_date, shard.run_id))))
        sink = io.BytesIO()
        pq.write_table(table, sink, compression={"rollout_id": "zstd", "step": "zstd",
                                                 "png": "none"})
        target.put_bytes(layout.frames_part_key(shard.run_date, shard.run_id, shard.unit_id),
                         sink.getvalue(), content_type="application/vnd.apache.parquet")
        objects += 1
    return DecodeReport(units=len(shards), frames=frames, objects=objects, out=target.uri)

