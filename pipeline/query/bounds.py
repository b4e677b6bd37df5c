"""Bounds on one query's run: a memory limit and a deadline, and Ctrl-C / SIGTERM honoured.

DuckDB runs a query in C++ and does not look at Python's signals while it does, so a query
is run in a worker thread while the calling thread waits: the wait ends at the deadline, on
Ctrl-C or on SIGTERM (which `wham-batch` turns into the same interrupt), and then the
connection is interrupted (`con.interrupt()`) and the worker ends within moments. The
memory limit is DuckDB's own (`memory_limit`, nothing spilled to disk) plus the same bound
on the Arrow result the query hands back, so a runaway aggregate or a huge result ends in a
message, not in the machine's memory.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.contracts.errors import UserError

#: Seconds a query may run (`--timeout`), and the most it may be given: a week (a wait
#: much longer overflows the platform's clock).
DEFAULT_TIMEOUT_S = 300.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: The default memory limit: this share of the memory available when the query starts...
MEMORY_SHARE = 0.5
#: ...but never more than this, nor less than MIN_MEMORY.
MAX_DEFAULT_MEMORY = 4 * 2**30
MIN_MEMORY = 64 * 2**20
#: Seconds an interrupted query is given to stop before the command ends without it.
STOP_GRACE_S = 10.0
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def available_memory() -> int:
    """Bytes of memory available to new allocations now (MemAvailable), or the free pages
    where /proc does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def total_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_memory_limit() -> int:
    return max(MIN_MEMORY, min(MAX_DEFAULT_MEMORY, int(available_memory() * MEMORY_SHARE)))


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1.5g', '1048576' -> bytes; ValueError saying what is expected."""
    match = _SIZE.match(text)
    unit = match and match[2].lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size like 512MiB or 2GiB")
    return int(float(match[1]) * _UNITS[unit])


def show_size(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


@dataclass(frozen=True)
class QueryBounds:
    """How long and how much memory one query may take."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_bytes: int | None = None  # None: default_memory_limit() when the query starts

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s < float("inf"):
            raise UserError(f"--timeout must be a positive number of seconds, got "
                            f"{self.timeout_s}")
        if self.timeout_s > MAX_TIMEOUT_S:
            raise UserError(f"--timeout must be at most {MAX_TIMEOUT_S:g} s (a week), got "
                            f"{self.timeout_s:g}")
        if self.memory_bytes is not None and self.memory_bytes < MIN_MEMORY:
            raise UserError(f"--memory-limit must be at least {show_size(MIN_MEMORY)}, got "
                            f"{self.memory_bytes} bytes")
        if self.memory_bytes is not None and self.memory_bytes > total_memory():
            raise UserError(f"--memory-limit {show_size(self.memory_bytes)} is more than this "
                            f"machine's memory ({show_size(total_memory())})")

    def memory(self) -> int:
        return self.memory_bytes if self.memory_bytes is not None else default_memory_limit()


def run_bounded(fetch: Callable[[], Any], *, interrupt: Callable[[], None],
                timeout_s: float, what: str) -> Any:
    """`fetch()` in a worker thread; at the deadline, or when the waiting thread is
    interrupted (Ctrl-C, SIGTERM), `interrupt()` stops it. UserError at the deadline."""
    outcome: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: a join cut short by a signal ends for good

    def work() -> None:
        try:
            outcome["value"] = fetch()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="query", daemon=True).start()
    try:
        finished = done.wait(timeout_s)
    except BaseException:  # Ctrl-C or SIGTERM while waiting: stop the query, then go
        interrupt()
        done.wait(STOP_GRACE_S)
        raise
    if not finished:
        interrupt()
        done.wait(STOP_GRACE_S)
        raise UserError(f"{what}: stopped after {timeout_s:g} s, the query's time limit "
                        "(--timeout); filter on fewer rows (e.g. --run-id or a WHERE on "
                        "run_date) or allow more time")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
