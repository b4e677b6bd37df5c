"""Storage on the rough edges: folders without hard links, S3 transport failures and
conflicting conditional writes, each a clear error a caller can act on."""

from __future__ import annotations

import errno
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support.faultproxy import FaultProxy, s3_error_xml

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import (
    LocalStorage,
    S3Storage,
    StorageFatalError,
    TransientStorageError,
    open_storage,
)
from pipeline.contracts.storage.s3 import CONFLICT_ATTEMPTS, split_s3_uri
from pipeline.driver.lease import RunLease

MARKER = "_runs/run_date=2026-01-02/run_id=r/commits/u000001.json"


def _links_fail_with(monkeypatch: pytest.MonkeyPatch, code: int) -> list[int]:
    """os.link fails as it does on a file system without hard links (vfat, exFAT, some
    FUSE mounts, which a test cannot mount); returns the list of calls made."""
    calls: list[int] = []

    def link(*args: object, **kwargs: object) -> None:
        calls.append(code)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", link)
    return calls


@pytest.mark.parametrize("code", [errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK])
def test_markers_are_created_where_hard_links_are_refused(tmp_path, monkeypatch, code):
    calls = _links_fail_with(monkeypatch, code)
    storage = LocalStorage(tmp_path)
    assert storage.create_if_absent(MARKER, b"first") is True
    assert storage.create_if_absent(MARKER, b"second") is False
    assert calls == [code, code]  # the fallback ran, not the hard link
    assert storage.get_bytes(MARKER) == b"first"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["u000001.json"]


def test_the_run_lease_is_taken_where_hard_links_are_refused(tmp_path, monkeypatch):
    _links_fail_with(monkeypatch, errno.EPERM)
    storage = LocalStorage(tmp_path)
    lease = RunLease(storage, run_date="2026-01-02", run_id="r").acquire()
    try:
        assert storage.exists(layout.lease_key("2026-01-02", "r"))
        with pytest.raises(UserError, match="being run by another driver"):
            RunLease(storage, run_date="2026-01-02", run_id="r").acquire()
    finally:
        lease.release()


def test_a_full_disk_is_still_fatal_when_linking(tmp_path, monkeypatch):
    _links_fail_with(monkeypatch, errno.ENOSPC)
    with pytest.raises(StorageFatalError, match="is full"):
        LocalStorage(tmp_path).create_if_absent(MARKER, b"x")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# ---------------------------------------------------------------- S3 conditional creates


def _s3(root: str, endpoint: str) -> S3Storage:
    """Storage at `root` through `endpoint`, without boto3's own retries: the first
    failure reaches the caller."""
    bucket, prefix = split_s3_uri(root)
    return S3Storage(bucket, prefix, endpoint_url=endpoint, max_attempts=1)


def test_a_connection_lost_during_a_conditional_create_is_retryable(s3_server, s3_bucket):
    # Every request is forwarded, then its connection reset before the answer: the
    # create lands, but the client only sees a dropped connection (botocore's own error).
    with (FaultProxy(s3_server, rates={"reset": 1.0}, max_consecutive=99) as proxy,
          pytest.raises(OSError, match="failed while trying to create") as caught):
        _s3(s3_bucket, proxy.url).create_if_absent("marker.json", b"{}")
    assert proxy.counts["reset"] >= 1
    assert isinstance(caught.value, TransientStorageError)  # the writer retries it
    assert "test-secret" not in str(caught.value)
    # the retry finds the object its lost reply had created
    assert open_storage(s3_bucket).create_if_absent("marker.json", b"{}") is False


class _Conflict(BaseHTTPRequestHandler):
    """Answers every request 409 ConditionalRequestConflict, as S3 does while another
    conditional write of the same key is in flight (moto never does)."""

    protocol_version = "HTTP/1.1"
    puts: list[str] = []

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_PUT(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.puts.append(self.path)
        body = s3_error_xml("ConditionalRequestConflict",
                            "A conflicting operation is in progress.", self.path)
        self.send_response(409)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_conflicting_conditional_create_is_retryable_not_already_there(s3_server):
    # s3_server: only for its dummy credentials; the requests go to the server below
    _Conflict.puts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Conflict)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(OSError, match="ConditionalRequestConflict") as caught:
            _s3("s3://conflict-bucket/p", endpoint).create_if_absent("marker.json", b"{}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert isinstance(caught.value, TransientStorageError)  # the writer retries it
    assert len(_Conflict.puts) == CONFLICT_ATTEMPTS  # asked again before giving up


@pytest.mark.parametrize("kind, code", [("slowdown", "SlowDown"), ("error500", "InternalError")])
def test_a_busy_store_is_a_retryable_error_not_a_user_mistake(s3_server, s3_bucket, kind, code):
    open_storage(s3_bucket).put_bytes("seed.png", b"png")
    with (FaultProxy(s3_server, rates={kind: 1.0}, max_consecutive=99) as proxy,
          pytest.raises(OSError, match=f"S3 answered {code} on bucket") as caught):
        _s3(s3_bucket, proxy.url).get_bytes("seed.png")
    assert isinstance(caught.value, TransientStorageError)  # writers retry it; a seed read
    assert "test-secret" not in str(caught.value)  # is redone


def test_a_body_cut_off_is_read_again_after_a_pause(s3_server, s3_bucket):
    # Every answer is cut mid-body: boto3 does not retry that, get_bytes does, with backoff
    # (three reads in the same millisecond would not let a struggling store recover).
    open_storage(s3_bucket).put_bytes("seed.png", b"png" * 1000)
    bucket, prefix = split_s3_uri(s3_bucket)
    with FaultProxy(s3_server, rates={"reset": 1.0}, max_consecutive=99) as proxy:
        storage = S3Storage(bucket, prefix, endpoint_url=proxy.url, max_attempts=3)
        start = time.monotonic()
        with pytest.raises(TransientStorageError, match="while trying to read 'seed.png'"):
            storage.get_bytes("seed.png")
        elapsed = time.monotonic() - start
    assert proxy.counts["reset"] == 3
    assert elapsed >= 0.25 + 0.5  # the two pauses' least jitter: 0.5 x (0.5 s, 1 s)


def test_a_local_write_that_may_succeed_later_is_transient(tmp_path, monkeypatch):
    def broken_replace(src: str, dst: str, **_dir_fds: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(TransientStorageError, match="writing x.bin under .* failed"):
        LocalStorage(tmp_path).put_bytes("x.bin", b"new")
