"""Shared fixtures: a real S3 endpoint (moto) on loopback, a local Ray instance, and the
logging set-up that entry points change, put back.

Everything here talks only to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.contracts.logs import set_log_context

# One OpenMP (torch) thread per process unless the environment names a count: the suite's
# Ray actors, servers and child processes run beside the test process on a small machine,
# and more compute threads than free cores make every thread wait for the others (a
# one-clip `eval-demo` takes seconds with one thread, half a minute with two on two busy
# cores). Set before torch is first imported, so child processes and Ray workers inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Dummy credentials only: tests must never reach a real account.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "test-key-id",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_PORT_LINE = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
MOTO_START_TIMEOUT_S = 30.0


def _moto_server_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in a child process on 127.0.0.1; yields its endpoint URL.

    The endpoint and dummy credentials are exported for the whole session (and so reach
    Ray workers started afterwards), so every boto3 or pyarrow client in the tests talks
    to loopback.
    """
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _moto_server_command(0),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **S3_TEST_ENV},
        )
    try:
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        port = None
        while port is None:
            match = _PORT_LINE.search(log_path.read_text(errors="replace"))
            if match:
                port = int(match.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start: {log_path.read_text()[-2000:]}")
            else:
                time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        with pytest.MonkeyPatch.context() as mp:
            for name in _UNSET_ENV:
                mp.delenv(name, raising=False)
            for name, value in S3_TEST_ENV.items():
                mp.setenv(name, value)
            mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the moto server; returns the root URI `s3://<bucket>/prefix`."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/prefix"


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[None]:
    """A private local Ray instance (2 CPUs) for the session; workers see the S3 env."""
    import ray

    if ray.is_initialized():
        yield
        return
    env_vars = {name: os.environ[name] for name in (*S3_TEST_ENV, "AWS_ENDPOINT_URL_S3")}
    with pytest.MonkeyPatch.context() as mp:
        # A set RAY_ADDRESS would make ray.init connect to some cluster instead.
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env_vars})
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture
def keep_logging_config() -> Iterator[None]:
    """Entry points (jobs.nightly, jobs.run) set up structured logging in-process; undo it
    for later tests."""
    loggers = [logging.getLogger(name) for name in ("pipeline", "workers", "jobs")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    set_log_context(run_id=None)
