"""A key stays where it is needed: a key file is read with a bound and never blocks, and the
serving replicas, which hold only the key's digest, do not have the key in their process
environment either."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.muse import SERVER_KEY, ServeProcess
from support.procs import session_pids

from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import MAX_KEY_FILE_BYTES, hide_secret_env, read_key_file, redact
from pipeline.driver.preflight import check_endpoint
from pipeline.serve import ServeConfig, resolve_api_key

REPO = Path(__file__).resolve().parents[2]
#: Address space of the child that reads a key file (a loader without a bound would read
#: /dev/zero until it hits this).
CHILD_BYTES = 2 * 2**30

_RESOLVE = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({CHILD_BYTES}, {CHILD_BYTES}))
from pipeline.contracts.errors import UserError
from pipeline.serve import ServeConfig, resolve_api_key
try:
    resolve_api_key(ServeConfig(checkpoint="m", api_key_file=sys.argv[1]), environ={{}})
except UserError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "folder", "large"])
def test_a_key_file_is_read_with_a_bound_and_never_blocks(tmp_path: Path, kind: str) -> None:
    path = {"/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "fifo",
            "folder": tmp_path, "large": tmp_path / "large"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # nobody ever writes to it
    if kind == "large":
        path.write_bytes(b"k" * (MAX_KEY_FILE_BYTES + 1))
    child = subprocess.run([sys.executable, "-c", _RESOLVE, str(path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 3, child.stdout + child.stderr[-2000:]
    expected = "larger than 4096 bytes" if kind == "large" else "not a regular file"
    assert f"api_key_file {path}: {expected}" in child.stdout


def test_a_plain_key_file_still_reads(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(" k-file-3a9c\n")
    assert read_key_file(key, what="--api-key-file") == "k-file-3a9c"
    key.write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="--api-key-file .*: not UTF-8 text"):
        read_key_file(key, what="--api-key-file")
    with pytest.raises(UserError, match="cannot read"):
        resolve_api_key(ServeConfig(checkpoint="m", api_key_file=str(tmp_path / "no")),
                        environ={})


def test_a_hidden_key_leaves_the_environment_but_stays_masked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHAM_API_KEY", "k-hidden-77b1")
    hide_secret_env("WHAM_API_KEY")
    assert "WHAM_API_KEY" not in os.environ
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get("
                            "'WHAM_API_KEY', 'unset'))"], capture_output=True, text=True,
                           timeout=60)
    assert child.stdout.strip() == "unset"
    assert redact("key k-hidden-77b1 in a log line") == "key *** in a log line"


def _environ(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/environ").read_bytes()
    return b""


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def test_the_replicas_environment_holds_no_key(muse_server: ServeProcess) -> None:
    """Only `wham-batch serve` itself was given the key; every Ray process it started (the
    replicas among them) has only what the replicas need: its digest."""
    others = [pid for pid in session_pids(muse_server.proc.pid) if pid != muse_server.proc.pid]
    replicas = [pid for pid in others if b"MuseReplica" in _cmdline(pid)]
    assert replicas, [_cmdline(pid)[:80] for pid in others]
    holding = [_cmdline(pid)[:80] for pid in others if SERVER_KEY.encode() in _environ(pid)]
    assert holding == []


def test_a_key_with_space_inside_is_refused_without_showing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lines in a key file, or a line break in the key's variable: no header can carry
    it, and the probe's error used to quote the header, key and all."""
    key = tmp_path / "key"
    key.write_text("k-first-1a2b\nk-second-3c4d\n")
    with pytest.raises(UserError, match="api_key_file .*: the key has spaces") as refused:
        read_key_file(key, what="api_key_file")
    monkeypatch.setenv("MUSE_API_KEY", "k-env-5e6f\nk-more-7a8b")
    with pytest.raises(UserError, match="model.api_key_env: MUSE_API_KEY: the key has") as probe:
        check_endpoint("http://127.0.0.1:9/score", api_key_env="MUSE_API_KEY", timeout_s=5)
    with pytest.raises(UserError, match="WHAM_API_KEY: the key has") as served:
        resolve_api_key(ServeConfig(checkpoint="m"), environ={"WHAM_API_KEY": "k-env-5e6f k"})
    for text in (str(refused.value), str(probe.value), str(served.value)):
        assert not any(part in text for part in ("k-first", "k-second", "k-env", "k-more"))


def test_a_key_is_masked_without_the_line_break_it_was_set_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSE_API_KEY", "k-trail-9c0d\n")
    assert redact("Authorization: Bearer k-trail-9c0d") == "Authorization: Bearer ***"
