"""The run lease on a real folder and on the S3 endpoint: one holder at a time, stale leases
taken over, heartbeats refreshed, a lost lease noticed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from pipeline.driver.lease import RunLease, live_holder

DATE, RUN = "2026-01-02", "leased"
PID_NS = "/proc/self/ns/pid"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(request.getfixturevalue("s3_bucket"))


def lease(storage, **kwargs) -> RunLease:  # noqa: ANN001
    return RunLease(storage, run_date=DATE, run_id=RUN, **kwargs)


def holder(storage) -> dict:  # noqa: ANN001
    return json.loads(storage.get_bytes(layout.lease_key(DATE, RUN)))


def test_one_holder_at_a_time(storage):
    with lease(storage) as first:
        body = holder(storage)
        assert (body["host"], body["token"]) == (socket.gethostname(), first.token)
        with pytest.raises(UserError, match=f"being run by another driver \\(host "
                           f"{socket.gethostname()} pid {body['pid']}, heartbeat"):
            lease(storage).acquire()
    assert not storage.exists(layout.lease_key(DATE, RUN))  # released
    with lease(storage):
        pass


def test_drivers_starting_together_get_one_lease(storage):
    results: list[object] = []

    def take() -> None:
        candidate = lease(storage)
        try:
            results.append(candidate.acquire())
        except UserError as exc:
            results.append(exc)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [r for r in results if isinstance(r, RunLease)]
    assert len(results) == 6 and len(winners) == 1
    assert holder(storage)["token"] == winners[0].token
    winners[0].release()


def test_stale_leases_are_taken_over_with_a_log_line(storage, caplog):
    key = layout.lease_key(DATE, RUN)
    stale = {"host": "other-host", "pid": 1, "token": "old", "heartbeat": time.time() - 600}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open("/proc/sys/kernel/random/boot_id") as fh:
        boot_id = fh.read().strip()
    gone = {"host": socket.gethostname(), "pid": dead.pid, "token": "old",
            "heartbeat": time.time(), "boot_id": boot_id, "pid_ns": os.readlink(PID_NS)}
    for body, why in ((stale, "its last heartbeat was 6"),  # 600 s ago, and a moment
                      (gone, "its process no longer exists"),
                      (b"{garbled", "cannot be read")):
        storage.put_bytes(key, body if isinstance(body, bytes) else json.dumps(body).encode())
        with caplog.at_level("WARNING", logger="pipeline.driver"), lease(storage) as mine:
            assert holder(storage)["token"] == mine.token
        assert why in caplog.text
        caplog.clear()
    # a live holder elsewhere, heartbeat fresh: refused
    storage.put_bytes(key, json.dumps({**stale, "heartbeat": time.time()}).encode())
    with pytest.raises(UserError, match="host other-host pid 1"):
        lease(storage).acquire()


def test_heartbeat_refreshes_and_a_lost_lease_is_noticed(storage):
    mine = lease(storage, timeout_s=0.4).acquire()  # beats every 0.1 s
    try:
        first = holder(storage)["heartbeat"]
        deadline = time.monotonic() + 10
        while holder(storage)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(storage)["heartbeat"] > first
        mine.check()
        # another driver took it over (this one stalled past the timeout)
        storage.put_bytes(layout.lease_key(DATE, RUN), json.dumps(
            {**holder(storage), "token": "theirs", "pid": 4242, "host": "h2"}).encode())
        time.sleep(0.5)
        with pytest.raises(UserError, match="lost its lease to host h2 pid 4242"):
            mine.check()
    finally:
        mine.release()
    assert holder(storage)["token"] == "theirs"  # not deleted: it is not this driver's


def test_a_lease_whose_create_reply_was_lost_is_still_ours(s3_server, s3_bucket):
    """The conditional create lands, the connection is reset before the reply, boto3
    retries and gets 412: the lease found there has this driver's token."""
    from support.faultproxy import FaultProxy

    with FaultProxy(s3_server, rates={"reset": 1.0}, seed=0, max_consecutive=1) as proxy:
        through = open_storage(s3_bucket, endpoint_url=proxy.url)
        mine = lease(through).acquire()
        mine.release()
    assert proxy.counts["reset"] >= 1
    assert not open_storage(s3_bucket).exists(layout.lease_key(DATE, RUN))


def test_the_timeout_comes_from_the_environment_and_a_bad_value_is_named(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(str(tmp_path / "out"))
    monkeypatch.setenv("WHAM_LEASE_TIMEOUT_S", "7.5")
    assert RunLease(storage, run_date=DATE, run_id=RUN).timeout_s == 7.5
    for bad in ("2m", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("WHAM_LEASE_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="WHAM_LEASE_TIMEOUT_S=.*positive number"):
            RunLease(storage, run_date=DATE, run_id=RUN)
    # a bad value never breaks commands that do not take a lease
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "runs", "--help"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "WHAM_LEASE_TIMEOUT_S": "2m"})
    assert out.returncode == 0 and "usage" in out.stdout


# ---------------------------------------------------------------- the three ways a lease broke


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


_TAKE_IN_CHILD = """
import sys
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from pipeline.driver.lease import RunLease
try:
    RunLease(open_storage(sys.argv[1]), run_date=sys.argv[2], run_id=sys.argv[3]).acquire()
except UserError as exc:
    print(exc)
    sys.exit(3)
print("acquired")
"""


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare (a new PID namespace)")
def test_a_driver_in_another_pid_namespace_leaves_a_live_lease_alone(storage):
    """A container beside this one shares the host name and boot id, but not the pids: the
    holder's pid means nothing there, so only the heartbeat's age may judge the lease."""
    with lease(storage) as mine:
        out = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _TAKE_IN_CHILD,
             storage.uri, DATE, RUN],
            capture_output=True, text=True, timeout=120, cwd=REPO,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert out.returncode == 3, out.stdout + out.stderr
        assert f"being run by another driver (host {socket.gethostname()} pid {os.getpid()}" \
            in out.stdout
        assert holder(storage)["token"] == mine.token
        assert holder(storage)["pid_ns"] == os.readlink(PID_NS)


class _ReadsTogether:
    """The real storage, but a driver's first read of the lease waits until the other
    driver has read it too: both judge the same stale lease, then race to take it. With
    `stagger`, one of them then also waits until the other has written the lease: the
    slower of two drivers that judged the same moment."""

    def __init__(self, storage: Any, barrier: threading.Barrier, *, stagger: bool) -> None:
        self._storage, self._barrier, self._first = storage, barrier, True
        self._stagger = stagger

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._storage, name)
        if name not in ("get_tagged", "get_bytes"):
            return attr

        def read(*args: Any, **kwargs: Any) -> Any:
            answer = attr(*args, **kwargs)
            if self._first:
                self._first = False
                with suppress(threading.BrokenBarrierError):
                    if self._barrier.wait(timeout=10) == 0 and self._stagger:
                        self._until_rewritten()
            return answer
        return read

    def _until_rewritten(self) -> None:
        deadline = time.monotonic() + 10
        while holder(self._storage)["token"] == "old" and time.monotonic() < deadline:
            time.sleep(0.01)


def _take_together(storage: Any, *, stagger: bool) -> list[object]:
    """Two drivers take the lease at once: what each got (a RunLease or a UserError)."""
    barrier = threading.Barrier(2)
    results: list[object] = []

    def take() -> None:
        try:
            results.append(lease(_ReadsTogether(storage, barrier, stagger=stagger)).acquire())
        except UserError as exc:
            results.append(exc)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_two_drivers_taking_over_one_stale_lease_do_not_both_get_it(storage):
    trials = 12
    key = layout.lease_key(DATE, RUN)
    stale = {"host": "gone-host", "pid": 1, "token": "old", "heartbeat": time.time() - 600}
    doubles = 0
    for trial in range(trials):
        storage.put_bytes(key, json.dumps(stale).encode())
        results = _take_together(storage, stagger=trial % 2 == 1)
        winners = [r for r in results if isinstance(r, RunLease)]
        doubles += len(winners) > 1
        for winner in winners:
            winner.release()
        assert len(results) == 2 and winners
        losers = [r for r in results if isinstance(r, UserError)]
        assert all("being run by another driver" in str(exc) for exc in losers)
    assert doubles == 0, f"{doubles} of {trials} takeovers gave the lease to both drivers"


def test_a_heartbeat_in_the_future_locks_the_run_only_within_the_timeout(storage, caplog):
    key = layout.lease_key(DATE, RUN)
    elsewhere = {"host": "other-host", "pid": 1, "token": "old"}
    # a clock a little ahead: a live holder
    storage.put_bytes(key, json.dumps({**elsewhere, "heartbeat": time.time() + 30}).encode())
    with pytest.raises(UserError, match="host other-host pid 1"):
        lease(storage, timeout_s=60).acquire()
    assert live_holder(storage, run_date=DATE, run_id=RUN, timeout_s=60) is not None
    # further ahead than the timeout, or not a time at all: garbage, taken over at once
    for heartbeat, why in ((time.time() + 3600, "lies 3600s in the future"),
                           (1e18, "in the future"), ("NaN", "cannot be read")):
        body = json.dumps(elsewhere)[:-1] + f', "heartbeat": {heartbeat}}}'
        storage.put_bytes(key, body.encode())
        assert live_holder(storage, run_date=DATE, run_id=RUN, timeout_s=60) is None
        with caplog.at_level("WARNING", logger="pipeline.driver"), \
                lease(storage, timeout_s=60) as mine:
            assert holder(storage)["token"] == mine.token
        assert why in caplog.text
        caplog.clear()


def test_a_garbage_lease_is_taken_over_not_a_crash(storage, caplog):
    """Lease bytes nobody wrote: JSON nested past Python's recursion limit, and a pid
    larger than any (with this process's host, boot and namespace, so it is probed)."""
    key = layout.lease_key(DATE, RUN)
    here = {"host": socket.gethostname(), "boot_id": Path(BOOT_ID).read_text().strip(),
            "pid_ns": os.readlink(PID_NS), "token": "old", "heartbeat": time.time()}
    for body, why in ((b"[" * 60_000, "cannot be read"),
                      (json.dumps({**here, "pid": 2**70}).encode(), "no longer exists")):
        storage.put_bytes(key, body)
        assert live_holder(storage, run_date=DATE, run_id=RUN) is None
        with caplog.at_level("WARNING", logger="pipeline.driver"), lease(storage) as mine:
            assert holder(storage)["token"] == mine.token
        assert why in caplog.text
        caplog.clear()


def test_a_lease_that_is_a_folder_or_a_link_is_named(tmp_path):
    """Not "other drivers keep taking it" after three tries: what stands there, by name."""
    storage = open_storage(str(tmp_path / "out"))
    path = Path(storage.key_uri(layout.lease_key(DATE, RUN)))
    path.mkdir(parents=True)
    with pytest.raises(UserError, match=f"{path} is not a file"):
        lease(storage).acquire()
    path.rmdir()
    (tmp_path / "stale.json").write_text(json.dumps(
        {"host": "gone", "pid": 1, "token": "old", "heartbeat": time.time() - 600}))
    path.symlink_to(tmp_path / "stale.json")
    with pytest.raises(UserError, match=f"symbolic link {path}"):
        lease(storage).acquire()
    assert json.loads((tmp_path / "stale.json").read_text())["token"] == "old"
