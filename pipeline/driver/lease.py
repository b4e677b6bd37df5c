"""One driver per run: a lease object under the run's `_runs/` folder.

The lease (`_runs/run_date=.../run_id=.../lease.json`, layout.lease_key) is created with a
conditional write, so of two drivers starting together exactly one gets it. It names its
holder (host, pid, a random token) and a heartbeat time that a thread refreshes every
`timeout / 4` seconds while the run lives. Another driver (`run`, `run --fresh`, nightly)
that finds a live lease stops with a message naming the holder. A lease counts as stale
when its heartbeat is older than the timeout (`WHAM_LEASE_TIMEOUT_S`, default 120 s), or at
once when its holder ran on this machine and its process is gone (a driver killed with
SIGKILL); a stale lease is taken over, with a log line saying whose it was.

The heartbeat re-reads the lease first: a driver that finds someone else's token there has
lost it (it stalled past the timeout and was taken over) and must not write `_SUCCESS`;
`check()` says so. Clocks of different machines are compared through the heartbeat time, so
keep the timeout well above their skew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import Storage

log = logging.getLogger("pipeline.driver")
#: Seconds after its last heartbeat that a lease is stale (`WHAM_LEASE_TIMEOUT_S`).
LEASE_TIMEOUT_S = 120.0
#: Tries at taking a lease that other drivers keep taking.
ACQUIRE_TRIES = 3


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name` (`default` when
    unset). Read when needed, so a bad value fails the command that uses it with an error
    naming the variable, not every command at import."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise UserError(f"{name}={text!r}: expected a positive number of seconds")
    return value


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@dataclass(frozen=True, slots=True)
class Holder:
    host: str
    pid: int
    token: str
    heartbeat: float  # time.time() of the holder's last refresh
    boot_id: str = ""

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            body = json.loads(data)
            return cls(host=str(body["host"]), pid=int(body["pid"]), token=str(body["token"]),
                       heartbeat=float(body["heartbeat"]), boot_id=str(body.get("boot_id", "")))
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}"


class RunLease:
    """The lease of one run; `acquire()` it before touching the run, `release()` after."""

    def __init__(self, storage: Storage, *, run_date: str, run_id: str,
                 timeout_s: float | None = None) -> None:
        self.storage = storage
        self.run_id = run_id
        self.key = layout.lease_key(run_date, run_id)
        self.timeout_s = (timeout_s if timeout_s is not None
                          else env_seconds("WHAM_LEASE_TIMEOUT_S", LEASE_TIMEOUT_S))
        self.token = uuid.uuid4().hex
        self.lost_to: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "token": self.token, "heartbeat": time.time(),
                           "boot_id": _boot_id(), "run_id": self.run_id}).encode()

    def _holder(self) -> Holder | None:
        try:
            return Holder.parse(self.storage.get_bytes(self.key))
        except FileNotFoundError:
            return None

    def _stale(self, holder: Holder | None) -> str | None:
        """Why the lease can be taken over, or None while its holder is alive."""
        if holder is None:
            return "the lease object cannot be read"
        age = time.time() - holder.heartbeat
        if age > self.timeout_s:
            return f"its last heartbeat was {age:.0f}s ago (timeout {self.timeout_s:.0f}s)"
        same_machine = holder.host == socket.gethostname() and holder.boot_id == _boot_id()
        if same_machine and holder.pid != os.getpid() and not _process_exists(holder.pid):
            return "its process no longer exists"
        return None

    def acquire(self) -> RunLease:
        """Take the lease (or a stale one over); UserError naming a live holder."""
        for _ in range(ACQUIRE_TRIES):
            if self.storage.create_if_absent(self.key, self._body()):
                self._start_heartbeat()
                return self
            holder = self._holder()
            if holder is not None and holder.token == self.token:
                # Our create landed but its reply was lost; the retry found our own lease.
                self._start_heartbeat()
                return self
            if holder is None and not self.storage.exists(self.key):
                continue  # released meanwhile
            why = self._stale(holder)
            if why is None:
                assert holder is not None
                age = time.time() - holder.heartbeat
                raise UserError(
                    f"run {self.run_id} is being run by another driver ({holder.describe()}, "
                    f"heartbeat {age:.0f}s ago; lease {self.storage.key_uri(self.key)}). Wait "
                    "for it to finish or stop it; its lease counts as stale "
                    f"{self.timeout_s:.0f}s after its last heartbeat (WHAM_LEASE_TIMEOUT_S).")
            log.warning("run %s: taking over the lease of %s: %s", self.run_id,
                        holder.describe() if holder else "an unknown driver", why)
            self.storage.delete(self.key)
        raise UserError(f"run {self.run_id}: could not take its lease "
                        f"({self.storage.key_uri(self.key)}); other drivers keep taking it")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="wham-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                holder = self._holder()
                if holder is None or holder.token != self.token:
                    self.lost_to = holder
                    log.error("run %s: lost its lease to %s", self.run_id,
                              holder.describe() if holder else "nobody (it was deleted)")
                    return
                self.storage.put_bytes(self.key, self._body(), content_type="application/json")
            except Exception as exc:  # a missed beat is retried; the timeout allows several
                log.warning("run %s: lease heartbeat failed: %s", self.run_id, exc)

    def check(self) -> None:
        """UserError when this driver no longer holds the lease."""
        holder = self._holder() if self.lost_to is None else self.lost_to
        if holder is None or holder.token != self.token:
            who = holder.describe() if holder else "nobody (it was deleted)"
            raise UserError(f"run {self.run_id}: this driver lost its lease to {who} while "
                            "running; not marking the run complete. Rerun to resume it.")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            holder = self._holder()
            if holder is not None and holder.token == self.token:
                self.storage.delete(self.key)
        except (OSError, UserError) as exc:  # storage gone: the lease goes stale by itself
            log.warning("run %s: could not release its lease: %s", self.run_id, exc)

    def live_holder(self) -> Holder | None:
        """Who holds the lease while it is live (not stale); None when nobody does. Reads
        only: for tools that show whether a run is running."""
        holder = self._holder()
        return holder if holder is not None and self._stale(holder) is None else None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
