"""One driver per run: a lease object under the run's `_runs/` folder.

The lease (`_runs/run_date=.../run_id=.../lease.json`, layout.lease_key) names its holder
(host, pid, PID namespace, a random token) and a heartbeat time that a thread refreshes
every `timeout / 4` seconds while the run lives. Another driver (`run`, `run --fresh`,
nightly) that finds a live lease stops with a message naming the holder.

Every write of the lease is conditional (storage `put_if`/`delete_if`: S3 If-None-Match /
If-Match on the ETag, locally a compare and rename under a lock): it is created only where
there is none, and replaced (heartbeat, takeover) or deleted (release) only if it is still
the version this driver read. So of two drivers that start together, or that judge the same
stale lease at the same moment, exactly one gets it; the other reads the winner's lease.

A lease is stale when its heartbeat is older than the timeout (`WHAM_LEASE_TIMEOUT_S`,
default 120 s), when the heartbeat lies more than the timeout in the future (a clock that
far off, or garbage: it would lock the run for good), or at once when its holder ran on
this machine in this PID namespace and its process is gone (a driver killed with SIGKILL).
A pid means nothing in another namespace (a container beside this one shares the host name
and boot id), so a lease from elsewhere goes stale by its age alone. A stale lease is taken
over, with a log line saying whose it was.

The heartbeat re-reads the lease first: a driver that finds someone else's token there has
lost it (it stalled past the timeout and was taken over) and must not write `_SUCCESS`;
`check()` says so. Clocks of different machines are compared through the heartbeat time, so
keep the timeout well above their skew.
"""

from __future__ import annotations

import json
import logging
import math
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
from pipeline.contracts.storage.base import ObjectTooLarge

log = logging.getLogger("pipeline.driver")
#: Seconds after its last heartbeat that a lease is stale (`WHAM_LEASE_TIMEOUT_S`).
LEASE_TIMEOUT_S = 120.0
#: Tries at taking a lease that other drivers keep taking.
ACQUIRE_TRIES = 3
#: A lease is a few hundred bytes; anything much larger is not one.
MAX_LEASE_BYTES = 64 * 1024


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


def _pid_namespace() -> str:
    """This process's PID namespace ('pid:[4026531836]'); '' where /proc does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none, or a pid no process can have
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
    pid_ns: str = ""  # '' in leases written before the namespace was recorded

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            body = json.loads(data)
            holder = cls(host=str(body["host"]), pid=int(body["pid"]),
                         token=str(body["token"]), heartbeat=float(body["heartbeat"]),
                         boot_id=str(body.get("boot_id", "")),
                         pid_ns=str(body.get("pid_ns", "")))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError,
                RecursionError):  # JSON nested deeper than Python parses: not a lease
            return None
        return holder if math.isfinite(holder.heartbeat) else None

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}"

    def pid_visible(self) -> bool:
        """Whether this holder's pid names a process here: same machine, same boot, and
        the same PID namespace recorded in the lease."""
        return (self.host == socket.gethostname() and self.boot_id == _boot_id()
                and bool(self.pid_ns) and self.pid_ns == _pid_namespace()
                and self.pid != os.getpid())


def stale_reason(holder: Holder | None, *, timeout_s: float) -> str | None:
    """Why a lease with this holder can be taken over, or None while the holder is alive."""
    if holder is None:
        return "the lease object cannot be read"
    age = time.time() - holder.heartbeat
    if age > timeout_s:
        return f"its last heartbeat was {age:.0f}s ago (timeout {timeout_s:.0f}s)"
    if -age > timeout_s:
        return (f"its heartbeat lies {-age:.0f}s in the future, more than the timeout "
                f"({timeout_s:.0f}s): a clock that far off or a damaged lease")
    if holder.pid_visible() and not _process_exists(holder.pid):
        return "its process no longer exists"
    return None


def live_holder(storage: Storage, *, run_date: str, run_id: str,
                timeout_s: float | None = None) -> Holder | None:
    """Who holds the run's lease now, or None when nobody does (no lease, or a stale one)."""
    timeout = timeout_s if timeout_s is not None else lease_timeout_s()
    try:
        holder = Holder.parse(storage.get_bytes(layout.lease_key(run_date, run_id),
                                                max_bytes=MAX_LEASE_BYTES))
    except (FileNotFoundError, ObjectTooLarge):  # none, or not one this tool wrote
        return None
    return holder if stale_reason(holder, timeout_s=timeout) is None else None


def lease_timeout_s() -> float:
    return env_seconds("WHAM_LEASE_TIMEOUT_S", LEASE_TIMEOUT_S)


class RunLease:
    """The lease of one run; `acquire()` it before touching the run, `release()` after."""

    def __init__(self, storage: Storage, *, run_date: str, run_id: str,
                 timeout_s: float | None = None) -> None:
        self.storage = storage
        self.run_id = run_id
        self.key = layout.lease_key(run_date, run_id)
        self.timeout_s = timeout_s if timeout_s is not None else lease_timeout_s()
        self.token = uuid.uuid4().hex
        self.lost_to: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "pid_ns": _pid_namespace(), "token": self.token,
                           "heartbeat": time.time(), "boot_id": _boot_id(),
                           "run_id": self.run_id}).encode()

    def _read(self) -> tuple[Holder | None, str] | None:
        """(the holder, or None when unreadable; the version tag), or None with no lease."""
        try:
            data, tag = self.storage.get_tagged(self.key, max_bytes=MAX_LEASE_BYTES)
        except FileNotFoundError:
            return None
        except ObjectTooLarge:
            raise UserError(
                f"run {self.run_id}: the lease {self.storage.key_uri(self.key)} is larger "
                f"than {MAX_LEASE_BYTES} bytes, so not one this tool wrote; delete it if no "
                "driver is running the run") from None
        return Holder.parse(data), tag

    def _holder(self) -> Holder | None:
        found = self._read()
        return None if found is None else found[0]

    def acquire(self) -> RunLease:
        """Take the lease (or a stale one over); UserError naming a live holder."""
        for _ in range(ACQUIRE_TRIES):
            if self.storage.put_if(self.key, self._body(), match=None) is not None:
                return self._held()
            found = self._read()
            if found is None:
                continue  # released meanwhile
            holder, tag = found
            if holder is not None and holder.token == self.token:
                # Our write landed but its reply was lost; the retry found our own lease.
                return self._held()
            why = stale_reason(holder, timeout_s=self.timeout_s)
            if why is None:
                assert holder is not None
                raise self._refused(holder)
            log.warning("run %s: taking over the lease of %s: %s", self.run_id,
                        holder.describe() if holder else "an unknown driver", why)
            if self.storage.put_if(self.key, self._body(), match=tag) is not None:
                return self._held()
            # another driver wrote the lease first (took it over, or beat): look again
        raise UserError(f"run {self.run_id}: could not take its lease "
                        f"({self.storage.key_uri(self.key)}); other drivers keep taking it")

    def _refused(self, holder: Holder) -> UserError:
        age = time.time() - holder.heartbeat
        return UserError(
            f"run {self.run_id} is being run by another driver ({holder.describe()}, "
            f"heartbeat {age:.0f}s ago; lease {self.storage.key_uri(self.key)}). Wait "
            "for it to finish or stop it; its lease counts as stale "
            f"{self.timeout_s:.0f}s after its last heartbeat (WHAM_LEASE_TIMEOUT_S).")

    def _held(self) -> RunLease:
        self._thread = threading.Thread(target=self._beat, name="wham-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                found = self._read()
                holder, tag = found if found is not None else (None, "")
                if holder is None or holder.token != self.token:
                    self.lost_to = holder
                    log.error("run %s: lost its lease to %s", self.run_id,
                              holder.describe() if holder else "nobody (it was deleted)")
                    return
                # Conditional: a driver that took the lease over since the read keeps it.
                # Not written: the next beat reads who has it now.
                self.storage.put_if(self.key, self._body(), match=tag)
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
            found = self._read()
            if found is not None and found[0] is not None and found[0].token == self.token:
                self.storage.delete_if(self.key, match=found[1])
        except (OSError, UserError) as exc:  # storage gone: the lease goes stale by itself
            log.warning("run %s: could not release its lease: %s", self.run_id, exc)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
