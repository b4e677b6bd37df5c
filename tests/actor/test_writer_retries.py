"""The writer retries a write that failed for a passing reason, spaced by a backoff, and
gives up at once when the store is full or read-only; markers carry the plan fingerprint
and their own checksum."""

from __future__ import annotations

import errno
import json
import time

import pytest

from pipeline.contracts import layout
from pipeline.contracts.markers import MarkerProblem, read_marker
from pipeline.contracts.storage import LocalStorage, StorageFatalError
from workers.actor.writer import WRITE_ATTEMPTS, OutputWriter, WriteError, WriterSettings

RUN = {"run_date": "2026-01-02", "run_id": "r"}


class FlakyStorage(LocalStorage):
    """A real folder whose puts of keys containing `fail_on` fail with `errno_` the first
    `times` times; it records when each attempt came."""

    def __init__(self, root, *, fail_on: str, times: int, errno_: int) -> None:  # noqa: ANN001
        super().__init__(root)
        self.fail_on, self.times, self.errno_ = fail_on, times, errno_
        self.attempts: list[float] = []

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        if self.fail_on in key:
            self.attempts.append(time.monotonic())
            if len(self.attempts) <= self.times:
                raise self._fatal(OSError(self.errno_, "injected"), key)
        super().put_bytes(key, data, content_type=content_type)


def finish(storage, *, fingerprint: str = "f" * 64):  # noqa: ANN001, ANN201
    writer = OutputWriter(storage, WriterSettings(**RUN, frame_mode="none", image_tokens=False,
                                                  model_id="m", threads=1))
    with writer:
        return writer.finish_unit("u000000", plan_fingerprint=fingerprint)


def test_transient_errors_are_retried_with_backoff(tmp_path):
    storage = FlakyStorage(tmp_path, fail_on="steps/", times=2, errno_=errno.EIO)
    assert finish(storage).committed
    assert len(storage.attempts) == 3
    gaps = [b - a for a, b in zip(storage.attempts, storage.attempts[1:], strict=False)]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5  # backoff_delay(0) and (1), jitter included


def test_a_write_that_keeps_failing_gives_up_after_the_attempts(tmp_path):
    storage = FlakyStorage(tmp_path, fail_on="steps/", times=99, errno_=errno.EIO)
    with pytest.raises(OSError, match="injected"):
        finish(storage)
    assert len(storage.attempts) == WRITE_ATTEMPTS
    assert not storage.exists(layout.commit_key(**RUN, unit_id="u000000"))


@pytest.mark.parametrize("code, what", [(errno.ENOSPC, "is full"),
                                        (errno.EROFS, "read-only file system")])
def test_a_full_or_read_only_store_fails_at_once(tmp_path, code, what):
    storage = FlakyStorage(tmp_path, fail_on="steps/", times=99, errno_=code)
    with pytest.raises(StorageFatalError, match=what):
        finish(storage)
    assert len(storage.attempts) == 1


def test_frame_upload_failing_for_good_is_not_wrapped(tmp_path):
    import numpy as np

    storage = FlakyStorage(tmp_path, fail_on="frames/", times=99, errno_=errno.ENOSPC)
    writer = OutputWriter(storage, WriterSettings(**RUN, frame_mode="png", image_tokens=False,
                                                  model_id="m", threads=1))
    with writer:
        writer.add_step("u000000", "s-r000", step=0, image=np.zeros((3, 8, 8), np.uint8),
                        action=np.zeros(16, np.int64), generated=False, action_source="seed")
        with pytest.raises(StorageFatalError, match="is full"):  # not a WriteError
            writer.finish_unit("u000000")
    assert not issubclass(StorageFatalError, WriteError)


def test_markers_carry_the_plan_and_their_checksum(tmp_path):
    storage = LocalStorage(tmp_path)
    finish(storage, fingerprint="abc")
    key = layout.commit_key(**RUN, unit_id="u000000")
    data = storage.get_bytes(key)
    marker = read_marker(data, unit_id="u000000")
    assert marker["plan_fingerprint"] == "abc" and marker["schema_version"] == 3
    body = json.loads(data)
    for broken, why in ((data[:40], "not valid JSON"),
                        (json.dumps({**body, "ok": 99}).encode(), "checksum does not match"),
                        (b"[1]", "not a JSON object"),
                        (bytes(100_000), "more than a marker ever holds")):
        with pytest.raises(MarkerProblem, match=why):
            read_marker(broken, unit_id="u000000")
    with pytest.raises(MarkerProblem, match="names unit 'u000000'"):
        read_marker(data, unit_id="u000001")
    legacy = json.dumps({"schema_version": 1, "ok": 2, "failed": 0}).encode()
    assert read_marker(legacy, unit_id="u000000")["ok"] == 2  # version 1: no checksum yet
