"""The output writer against real storage: PNGs, GIFs, Parquet parts and commit markers."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.contracts import layout
from pipeline.contracts.parts import part_metadata
from pipeline.contracts.storage import LocalStorage, open_storage
from workers.actor.encode import WATERMARK_TEXT, corner_block_size
from workers.actor.writer import OutputWriter, WriteError, WriterSettings
from workers.wham.actions import BUTTON_NAMES, STICK_BIN_CENTRES, STICK_NAMES

RUN = {"run_date": "2026-11-30", "run_id": "test-run"}
NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def rollout_row(rollout_id: str, *, status: str = "ok", error: str | None = None) -> dict:
    return {
        "rollout_id": rollout_id,
        "seed_id": rollout_id.split("-r")[0],
        "seed_uri": f"s3://seeds/{rollout_id}.png",
        "rollout_index": 0,
        "mode": "world_model",
        "action_policy": "random",
        "context_steps": 2,
        "generated_steps": 3,
        "temperature": 0.9,
        "top_k": None,
        "top_p": 1.0,
        "greedy": False,
        "rng_seed": 12345,
        "model_id": "preset:tiny",
        "model_sha256": "ab" * 32,
        "status": status,
        "error": error,
        "worker": "w0",
        "started_at": NOW,
        "finished_at": NOW,
        "generate_seconds": 1.5,
    }


def make_writer(storage, **kw) -> OutputWriter:
    options = dict(
        frame_mode="png",
        previews=False,
        preview_scale=1,
        image_tokens=True,
        watermark=True,
        model_id="preset:tiny",
        threads=2,
        tokens_per_image=16,
    )
    options.update(kw)
    return OutputWriter(storage, WriterSettings(**RUN, **options))


def frame(seed: int, h: int = 16, w: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


def action(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(0, 2, 12), rng.integers(0, 11, 4)])


def feed_rollout(writer, unit_id, rollout_id, *, context=2, generated=3, h=16, w=16):
    """Context then generated steps, as the actor sends them; returns what was sent."""
    sent = []
    for step in range(context + generated):
        gen = step >= context
        img, act = frame(step, h, w), action(step)
        tokens = np.arange(16, dtype=np.int64) + step if gen else None
        writer.add_step(
            unit_id,
            rollout_id,
            step=step,
            image=img,
            action=act,
            generated=gen,
            action_source="given" if gen else "seed",
            image_tokens=tokens,
        )
        sent.append((img, act, gen, tokens))
    return sent


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(request.getfixturevalue("s3_bucket"))


def test_unit_round_trip(storage):
    with make_writer(storage) as writer:
        sent = feed_rollout(writer, "u000000", "seed_b-r000")
        feed_rollout(writer, "u000000", "seed_a-r000")
        feed_rollout(writer, "u000000", "seed_c-r000", generated=1)  # fails below
        writer.finish_rollout("u000000", rollout_row("seed_b-r000"))
        writer.finish_rollout("u000000", rollout_row("seed_a-r000"))
        writer.finish_rollout("u000000", rollout_row("seed_c-r000", status="failed", error="boom"))
        result = writer.finish_unit("u000000")
    assert (result.rollouts, result.ok, result.failed, result.steps) == (3, 2, 1, 10)
    assert result.stored_frames == 13 and result.committed  # the failed rollout's 3 too
    assert result.generated_frames == 6  # 2 ok rollouts x 3 generated steps

    steps = pq.read_table(
        io.BytesIO(storage.get_bytes(layout.steps_part_key(**RUN, unit_id="u000000")))
    )
    assert steps.schema.equals(layout.STEPS_SCHEMA)
    assert steps.schema.metadata == part_metadata(
        layout.STEPS_TABLE, **RUN, unit_id="u000000", plan_fingerprint="")
    assert steps.column("rollout_id").to_pylist() == ["seed_a-r000"] * 5 + ["seed_b-r000"] * 5
    rows = steps.to_pylist()[5:]  # seed_b, in step order
    for step, (row, (_, act, gen, tokens)) in enumerate(zip(rows, sent, strict=True)):
        assert row["step"] == step and row["generated"] == gen
        assert row["action_source"] == ("given" if gen else "seed")
        assert [row[b] for b in BUTTON_NAMES] == [bool(v) for v in act[:12]]
        assert [row[s] for s in STICK_NAMES] == [float(STICK_BIN_CENTRES[v]) for v in act[12:]]
        assert row["action_bins"] == act.tolist()
        assert row["image_tokens"] == (None if tokens is None else tokens.tolist())
        assert row["frame_key"] == layout.frame_key(**RUN, rollout_id="seed_b-r000", step=step)
        assert row["timestamp_s"] == pytest.approx(step / 10)
        assert storage.exists(row["frame_key"])

    rollouts = pq.read_table(
        io.BytesIO(storage.get_bytes(layout.rollouts_part_key(**RUN, unit_id="u000000")))
    )
    assert rollouts.schema.equals(layout.ROLLOUTS_SCHEMA)
    assert rollouts.schema.metadata == part_metadata(
        layout.ROLLOUTS_TABLE, **RUN, unit_id="u000000", plan_fingerprint="")
    by_id = {r["rollout_id"]: r for r in rollouts.to_pylist()}
    assert by_id["seed_c-r000"]["status"] == "failed" and by_id["seed_c-r000"]["error"] == "boom"
    assert by_id["seed_a-r000"]["unit_id"] == "u000000"
    assert by_id["seed_a-r000"]["started_at"] == NOW

    marker = json.loads(storage.get_bytes(layout.commit_key(**RUN, unit_id="u000000")))
    assert marker["ok"] == 2 and marker["failed"] == 1 and marker["stored_frames"] == 13
    assert marker["generated_frames"] == 6
    assert marker["schema_version"] == layout.SCHEMA_VERSION and marker["run_id"] == "test-run"


def png_at(storage, rollout_id: str, step: int) -> Image.Image:
    key = layout.frame_key(**RUN, rollout_id=rollout_id, step=step)
    img = Image.open(io.BytesIO(storage.get_bytes(key)))
    img.load()
    return img


def test_png_provenance_and_watermark_tiny_frames(tmp_path):
    storage = LocalStorage(tmp_path)
    with make_writer(storage) as writer:
        sent = feed_rollout(writer, "u000001", "s-r000")
        writer.finish_rollout("u000001", rollout_row("s-r000"))
        writer.finish_unit("u000001")
    for step, (img_chw, _, gen, _) in enumerate(sent):
        png = png_at(storage, "s-r000", step)
        assert png.size == (16, 16) and png.mode == "RGB"
        assert png.text["Software"] == "wham-batch"
        assert png.text["model_id"] == "preset:tiny" and png.text["run_id"] == "test-run"
        assert png.text["rollout_id"] == "s-r000" and png.text["step"] == str(step)
        assert png.text["generated"] == ("true" if gen else "false")
        pixels = np.asarray(png)
        original = img_chw.transpose(1, 2, 0)
        side = corner_block_size(16, 16)
        if not gen:  # seed frames: untouched pixels
            np.testing.assert_array_equal(pixels, original)
            continue
        np.testing.assert_array_equal(pixels[:-side, :], original[:-side, :])
        np.testing.assert_array_equal(pixels[:, :-side], original[:, :-side])
        block = pixels[-side:, -side:]
        assert {tuple(p) for p in block.reshape(-1, 3)} == {(0, 0, 0), (255, 255, 255)}


def test_watermark_text_on_full_size_frames(tmp_path):
    storage = LocalStorage(tmp_path)
    with make_writer(storage, image_tokens=False) as writer:
        writer.add_step(
            "u000002",
            "s-r000",
            step=0,
            image=np.zeros((3, 180, 300), np.uint8),
            action=action(0),
            generated=True,
            action_source="model",
        )
        writer.finish_rollout("u000002", rollout_row("s-r000"))
        writer.finish_unit("u000002")
    pixels = np.asarray(png_at(storage, "s-r000", 0))
    assert pixels.shape == (180, 300, 3)
    changed = np.argwhere(pixels.max(axis=2) > 0)
    assert len(changed) > 200  # the text was drawn, white on the black frame
    assert changed[:, 0].min() > 180 * 3 // 4 and changed[:, 1].min() > 300 // 3  # bottom right
    assert (pixels.min(axis=2) > 200).sum() > 100  # bright text pixels
    assert WATERMARK_TEXT == "Generated by WHAM"


def test_no_watermark_when_disabled(tmp_path):
    storage = LocalStorage(tmp_path)
    with make_writer(storage, watermark=False) as writer:
        sent = feed_rollout(writer, "u000003", "s-r000")
        writer.finish_rollout("u000003", rollout_row("s-r000"))
        writer.finish_unit("u000003")
    np.testing.assert_array_equal(
        np.asarray(png_at(storage, "s-r000", 4)), sent[4][0].transpose(1, 2, 0)
    )


class RecordingStorage(LocalStorage):
    """A real local storage that records the order of writes (and can fail some)."""

    def __init__(self, root, *, fail_on: str | None = None, delay_s: float = 0.0):
        super().__init__(root)
        self.writes: list[str] = []
        self.fail_on = fail_on
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0
        self._count = threading.Lock()

    def _record(self, key: str) -> None:
        with self._count:
            self.writes.append(key)

    def put_bytes(self, key, data, *, content_type=None):
        with self._count:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            if self.fail_on and self.fail_on in key:
                raise OSError(f"simulated outage writing {key}")
            super().put_bytes(key, data, content_type=content_type)
            self._record(key)
        finally:
            with self._count:
                self.in_flight -= 1

    def create_if_absent(self, key, data):
        created = super().create_if_absent(key, data)
        self._record(key)
        return created


def test_commit_marker_is_written_last(tmp_path):
    storage = RecordingStorage(tmp_path, delay_s=0.01)
    with make_writer(storage, previews=True) as writer:
        feed_rollout(writer, "u000004", "s-r000")
        writer.finish_rollout("u000004", rollout_row("s-r000"))
        writer.finish_unit("u000004")
    kinds = [k.split("/")[0] for k in storage.writes]
    assert kinds[-1] == "_runs" and storage.writes[-1].endswith("commits/u000004.json")
    last_frame = max(i for i, k in enumerate(kinds) if k in ("frames", "previews"))
    first_part = min(i for i, k in enumerate(kinds) if k in ("steps", "rollouts"))
    assert last_frame < first_part
    assert kinds.count("frames") == 5 and kinds.count("previews") == 1


def test_failed_upload_fails_the_unit(tmp_path):
    storage = RecordingStorage(tmp_path, fail_on="000002.png")
    with make_writer(storage) as writer:
        # The failure surfaces in finish_unit, or earlier in add_step if it came first.
        with pytest.raises(WriteError, match="simulated outage"):
            feed_rollout(writer, "u000005", "s-r000")
            writer.finish_rollout("u000005", rollout_row("s-r000"))
            writer.finish_unit("u000005")
        writer.abort_unit("u000005")
        # Once an upload of a unit has failed, its next steps are refused at once.
        storage.fail_on = "t-r000"
        writer.add_step(
            "u000006",
            "t-r000",
            step=0,
            image=frame(0),
            action=action(0),
            generated=True,
            action_source="model",
        )
        deadline = time.monotonic() + 10
        with pytest.raises(WriteError, match="u000006"):
            while time.monotonic() < deadline:
                writer.add_step(
                    "u000006",
                    "t-r000",
                    step=1,
                    image=None,
                    action=action(0),
                    generated=True,
                    action_source="model",
                )
                time.sleep(0.01)
        writer.abort_unit("u000006")
    assert not storage.exists(layout.commit_key(**RUN, unit_id="u000005"))
    assert not storage.exists(layout.steps_part_key(**RUN, unit_id="u000005"))


def test_pending_uploads_are_bounded(tmp_path):
    storage = RecordingStorage(tmp_path, delay_s=0.02)
    with make_writer(storage, threads=2, max_pending=3) as writer:
        feed_rollout(writer, "u000007", "s-r000", context=1, generated=11)
        writer.finish_rollout("u000007", rollout_row("s-r000"))
        result = writer.finish_unit("u000007")
    assert result.stored_frames == 12
    assert storage.max_in_flight <= 2  # thread count
    assert writer._slots._value == 3  # every slot handed back  # noqa: SLF001


def test_gif_preview(storage):
    with make_writer(storage, previews=True, preview_scale=3) as writer:
        feed_rollout(writer, "u000008", "s-r000")
        writer.finish_rollout("u000008", rollout_row("s-r000"))
        result = writer.finish_unit("u000008")
    assert result.previews == 1
    gif = Image.open(io.BytesIO(storage.get_bytes(layout.preview_key(**RUN, rollout_id="s-r000"))))
    assert gif.format == "GIF" and gif.size == (48, 48) and gif.n_frames == 5
    assert b"preset:tiny" in gif.info["comment"] and b"s-r000" in gif.info["comment"]


def test_tokens_disabled_and_frames_disabled(tmp_path):
    storage = LocalStorage(tmp_path)
    with make_writer(storage, image_tokens=False, frame_mode="none") as writer:
        feed_rollout(writer, "u000009", "s-r000")
        writer.finish_rollout("u000009", rollout_row("s-r000"))
        result = writer.finish_unit("u000009")
    assert result.stored_frames == 0 and not list(storage.list_keys("frames/"))
    table = pq.read_table(tmp_path / layout.steps_part_key(**RUN, unit_id="u000009"))
    assert table.schema.equals(layout.STEPS_SCHEMA)
    assert table.column("image_tokens").null_count == 5
    assert table.column("frame_key").null_count == 5


def test_retry_overwrites_and_keeps_first_marker(tmp_path):
    storage = LocalStorage(tmp_path)
    tables = []
    for _ in range(2):
        with make_writer(storage) as writer:
            feed_rollout(writer, "u000010", "s-r000")
            writer.finish_rollout("u000010", rollout_row("s-r000"))
            tables.append(writer.finish_unit("u000010"))
    assert tables[0].committed and not tables[1].committed
    parts = [k for k in storage.list_keys("steps/")]
    assert parts == [layout.steps_part_key(**RUN, unit_id="u000010")]
    assert len(list(storage.list_keys("frames/"))) == 5


def test_bad_inputs(tmp_path):
    with make_writer(LocalStorage(tmp_path)) as writer:
        with pytest.raises(ValueError, match="button_A"):
            bad = action(0)
            bad[2] = 3
            writer.add_step(
                "u000011",
                "s-r000",
                step=0,
                image=frame(0),
                action=bad,
                generated=True,
                action_source="model",
            )
        with pytest.raises(ValueError, match="image tokens"):
            writer.add_step(
                "u000011",
                "s-r000",
                step=0,
                image=frame(0),
                action=action(0),
                generated=True,
                action_source="model",
                image_tokens=np.arange(5),
            )
        with pytest.raises(ValueError, match=r"\(3,H,W\)"):
            writer.add_step(
                "u000011",
                "s-r000",
                step=0,
                image=np.zeros((16, 16, 3), np.uint8),
                action=action(0),
                generated=True,
                action_source="model",
            )
        with pytest.raises(ValueError, match="missing"):
            writer.finish_rollout("u000011", {"rollout_id": "s-r000", "status": "ok"})
        writer.add_step(
            "u000012",
            "orphan-r000",
            step=0,
            image=None,
            action=action(0),
            generated=False,
            action_source="seed",
        )
        with pytest.raises(ValueError, match="orphan-r000"):
            writer.finish_unit("u000012")
    with pytest.raises(Exception, match="run_id"):
        WriterSettings(run_date="2026-11-30", run_id="../x", model_id="m")
    with pytest.raises(ValueError, match="frames must be one of"):
        make_writer(LocalStorage(tmp_path), frame_mode=True)
    assert pa.types.is_list(layout.STEPS_SCHEMA.field("image_tokens").type)


@pytest.mark.parametrize("background", [0, 128, 255, "noise"])
def test_cached_watermark_matches_direct_drawing(background):
    """The pasted, pre-rendered text equals drawing the text on the frame (within rounding)."""
    from PIL import ImageDraw

    from workers.actor import encode as watermark

    if background == "noise":
        base = np.random.default_rng(0).integers(0, 256, (180, 300, 3), dtype=np.uint8)
    else:
        base = np.full((180, 300, 3), background, np.uint8)
    fast = np.asarray(watermark.draw_watermark(Image.fromarray(base))).astype(int)
    slow_img = Image.fromarray(base)
    font = watermark._font(max(8, min(48, 180 // 15)))  # noqa: SLF001
    draw = ImageDraw.Draw(slow_img)
    left, top, right, bottom = draw.textbbox((0, 0), WATERMARK_TEXT, font=font, stroke_width=1)
    origin = (300 - 2 - (right - left) - left, 180 - 2 - (bottom - top) - top)
    draw.text(
        origin,
        WATERMARK_TEXT,
        font=font,
        fill=(255, 255, 255),
        stroke_width=1,
        stroke_fill=(0, 0, 0),
    )
    slow = np.asarray(slow_img).astype(int)
    assert np.abs(fast - slow).max() <= 1
    assert (fast != base).any(axis=2).sum() > 200
