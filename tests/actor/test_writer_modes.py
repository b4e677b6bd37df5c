"""Frame storage modes (png | parquet | none), per-step quality columns and MP4 videos,
against real storage: the same steps written in every mode, compared."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_writer import RUN, RecordingStorage, action, feed_rollout, frame, make_writer, rollout_row

from pipeline.contracts import layout
from pipeline.contracts.storage import LocalStorage, open_storage


def _write_unit(storage, mode: str, unit_id: str = "u000000", **kw):
    with make_writer(storage, frame_mode=mode, **kw) as writer:
        feed_rollout(writer, unit_id, "seed_b-r000")
        feed_rollout(writer, unit_id, "seed_a-r000")
        feed_rollout(writer, unit_id, "seed_c-r000", generated=1)
        writer.finish_rollout(unit_id, rollout_row("seed_b-r000"))
        writer.finish_rollout(unit_id, rollout_row("seed_a-r000"))
        writer.finish_rollout(unit_id, rollout_row("seed_c-r000", status="failed", error="x"))
        return writer.finish_unit(unit_id)


def _part(storage, key):
    return pq.read_table(io.BytesIO(storage.get_bytes(key)))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parquet_mode_holds_the_same_pngs_in_one_object(tmp_path, where, request):
    root = (str(tmp_path / "parquet") if where == "local"
            else request.getfixturevalue("s3_bucket"))
    parquet, png = open_storage(root), LocalStorage(tmp_path / "png")
    result = _write_unit(parquet, "parquet")
    _write_unit(png, "png")
    assert result.stored_frames == 10 and result.committed  # not the failed rollout's frames
    assert list(parquet.list_keys("frames/")) == [layout.frames_part_key(**RUN, unit_id="u000000")]
    frames = _part(parquet, layout.frames_part_key(**RUN, unit_id="u000000"))
    assert frames.schema.equals(layout.FRAMES_SCHEMA)
    assert frames.schema.metadata[b"wham_batch.unit_id"] == b"u000000"
    steps = _part(parquet, layout.steps_part_key(**RUN, unit_id="u000000"))
    # one frame per step row, in the same order, byte for byte the PNG the png mode uploads
    assert frames.column("rollout_id").to_pylist() == steps.column("rollout_id").to_pylist()
    assert frames.column("step").to_pylist() == steps.column("step").to_pylist()
    for row in frames.to_pylist():
        key = layout.frame_key(**RUN, rollout_id=row["rollout_id"], step=row["step"])
        assert row["png"] == png.get_bytes(key)
    assert set(steps.column("frame_key").to_pylist()) == {
        layout.frames_part_key(**RUN, unit_id="u000000")}
    marker = json.loads(parquet.get_bytes(layout.commit_key(**RUN, unit_id="u000000")))
    assert marker["stored_frames"] == frames.num_rows == 10


def test_parquet_mode_writes_frames_then_parts_then_marker(tmp_path):
    storage = RecordingStorage(tmp_path, delay_s=0.005)
    _write_unit(storage, "parquet")
    assert [k.split("/")[0] for k in storage.writes] == ["frames", "steps", "rollouts", "_runs"]


def test_none_mode_stores_only_tokens(tmp_path):
    storage = LocalStorage(tmp_path)
    result = _write_unit(storage, "none")
    assert result.stored_frames == 0 and not list(storage.list_keys("frames/"))
    steps = _part(storage, layout.steps_part_key(**RUN, unit_id="u000000"))
    assert steps.column("frame_key").null_count == steps.num_rows == 10
    generated = [r for r in steps.to_pylist() if r["generated"]]
    assert all(len(r["image_tokens"]) == 16 for r in generated)


def test_quality_columns(tmp_path):
    storage = LocalStorage(tmp_path)
    with make_writer(storage, frame_mode="none") as writer:
        for step in range(3):
            generated = step > 0
            quality = ({"image_logprob": -0.5 * step, "image_entropy": 0.25,
                        "action_logprob": float("nan"), "action_entropy": float("nan"),
                        "changed_fraction": 0.125, "not_a_signal": 3.0} if generated else None)
            writer.add_step("u000001", "s-r000", step=step, image=frame(step),
                            action=action(step), generated=generated,
                            action_source="given" if generated else "seed",
                            image_tokens=np.arange(16) + step, quality=quality)
        writer.finish_rollout("u000001", {**rollout_row("s-r000"), "mean_logprob": -0.75,
                                          "frozen": False, "collapse_step": None})
        writer.finish_unit("u000001")
    steps = _part(storage, layout.steps_part_key(**RUN, unit_id="u000001")).to_pylist()
    assert [r["image_logprob"] for r in steps] == [None, -0.5, -1.0]
    assert [r["changed_fraction"] for r in steps] == [None, 0.125, 0.125]
    assert all(r["action_logprob"] is None for r in steps)  # NaN (not sampled) is stored as null
    assert steps[0]["image_tokens"] == list(range(16))  # context steps keep their tokens
    row = _part(storage, layout.rollouts_part_key(**RUN, unit_id="u000001")).to_pylist()[0]
    assert row["mean_logprob"] == -0.75 and row["frozen"] is False and row["min_logprob"] is None


def _smooth(step: int) -> np.ndarray:
    """A flat-colour 16x16 frame (video codecs keep these nearly exact)."""
    return np.full((3, 16, 16), 30 * step, dtype=np.uint8)


def test_video_per_rollout(tmp_path):
    av = pytest.importorskip("av")
    storage = LocalStorage(tmp_path)
    with make_writer(storage, frame_mode="none", video=True, watermark=False) as writer:
        for step in range(7):
            writer.add_step("u000002", "s-r000", step=step, image=_smooth(step),
                            action=action(step), generated=step > 0,
                            action_source="given" if step else "seed")
        feed_rollout(writer, "u000002", "t-r000", generated=1)
        writer.finish_rollout("u000002", rollout_row("s-r000"))
        writer.finish_rollout("u000002", rollout_row("t-r000", status="failed", error="x"))
        writer.finish_unit("u000002")
    assert list(storage.list_keys("videos/")) == [layout.video_key(**RUN, rollout_id="s-r000")]
    data = storage.get_bytes(layout.video_key(**RUN, rollout_id="s-r000"))
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        pictures = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert "s-r000" in container.metadata.get("comment", "")
    assert len(pictures) == 7 and pictures[0].shape == (16, 16, 3)
    # Lossy, but every frame is recognisably the one sent, in order.
    means = [float(p.mean()) for p in pictures]
    assert means == pytest.approx([30.0 * step for step in range(7)], abs=4)
