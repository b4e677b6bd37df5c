"""Process helpers for tests that start their own Ray nodes: free loopback ports and the
processes of a `ray start --block` child's session (stopped by pid, never `ray stop`)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes in session `sid`: a node started as a child and everything it started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
    return pids
