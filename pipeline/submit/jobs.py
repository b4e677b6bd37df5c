"""Talking to a Ray cluster's Jobs API: connect (with token auth), submit, watch, stop.

Every request has a timeout; a dashboard that does not answer becomes a UserError that says
what to check, never a hang or a traceback.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import public_url, read_key_file, redact
from pipeline.driver.preflight import GCS_PORT
from pipeline.submit.packaging import Submission

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# (connect, read) seconds for each call to the dashboard; Ray's client has no default.
REQUEST_TIMEOUT_S = (10.0, 120.0)
_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
DEFAULT_POLL_S = 2.0
#: A line of Ray's own logging at INFO (`2026-12-07 03:29:50,140\tINFO job_manager.py:581 --
#: ...`); the project's lines look otherwise (`2026-12-07T03:29:50Z INFO pipeline.driver`).
RAY_INFO_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+INFO \S+:\d+ -- ")


def auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Bearer header for Ray token authentication, read the way Ray itself reads it.

    With RAY_AUTH_MODE=token (or a token given explicitly) the token comes from
    RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (a
    token file is read like a key file: bounded, and a pipe or a device is refused).
    With RAY_AUTH_MODE=disabled or nothing set, no header is sent.
    """
    environ = dict(os.environ if environ is None else environ)
    mode = environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = read_key_file(path, what="RAY_AUTH_TOKEN_PATH")
    if not token and mode == "token":
        default = Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
        if default.exists():
            token = read_key_file(default, what="Ray's token file")
    if not token:
        if mode == "token":
            raise UserError("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN or "
                            "RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token")
        return {}
    return {"Authorization": f"Bearer {token}"}


def _client_class() -> type[JobSubmissionClient]:
    from ray.job_submission import JobSubmissionClient

    class _TimedClient(JobSubmissionClient):
        # Ray sends its HTTP requests without a timeout; a hung dashboard must not hang us.
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
            return super()._do_request(method, endpoint, **kwargs)

    return _TimedClient


def resolve_address(address: str | None) -> str:
    """The dashboard URL (http[s]://HEAD:PORT) from --address, RAY_API_SERVER_ADDRESS or
    RAY_ADDRESS; HOST:PORT gets http://. Anything else is a UserError, before any wait."""
    given = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not given:
        raise UserError("no cluster address: pass --address http://HEAD:8265 "
                        "(the Ray dashboard) or set RAY_ADDRESS")
    url = given.strip() if "://" in given else f"http://{given.strip()}"
    scheme, _, rest = url.partition("://")
    host, _, port = rest.partition("/")[0].rpartition(":")
    if scheme not in ("http", "https") or not rest or port == str(GCS_PORT):
        raise UserError(
            f"{public_url(given)} is not a Ray dashboard address: the Jobs API is the dashboard's "
            "http://HEAD:8265 (a GCS address HEAD:6379 or ray://HEAD:10001 is what "
            "`wham-batch run --address` takes)")
    return url.rstrip("/")


class ClusterUnreachable(UserError):
    """The dashboard did not answer (refused, timed out); may be temporary."""


@contextmanager
def cluster_errors(address: str) -> Iterator[None]:
    """Turn connection and authentication failures into UserErrors that say what to do."""
    import requests

    address = public_url(address) or address  # no user:password in messages
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise UserError(
            f"the Ray cluster at {address} refused the request ({str(exc).splitlines()[0]}); "
            "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
            "cluster's token"
        ) from None
    except (ConnectionError, requests.RequestException) as exc:
        raise ClusterUnreachable(
            f"cannot reach the Ray dashboard at {address}: {exc}; check --address "
            "(http://HEAD:8265) and that the cluster is up") from None


@contextmanager
def _dashboard_url_only(url: str) -> Iterator[None]:
    """Ray's client reads RAY_API_SERVER_ADDRESS / RAY_ADDRESS over the address it is given,
    and for a GCS address looks the dashboard up through the GCS (a 40 s wait when nothing
    answers). Pin the resolved URL for the client's construction."""
    saved = os.environ.get(_API_SERVER_ENV)
    os.environ[_API_SERVER_ENV] = url
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_API_SERVER_ENV, None)
        else:
            os.environ[_API_SERVER_ENV] = saved


def connect(address: str | None) -> JobSubmissionClient:
    """A Jobs API client for `address` (with the auth token when token auth is on)."""
    address = resolve_address(address)
    headers = auth_headers()
    with cluster_errors(address), _dashboard_url_only(address):
        try:
            return _client_class()(address, headers=headers or None)
        except RuntimeError as exc:  # answered, but not as a Ray 2 dashboard
            raise UserError(f"{public_url(address)} did not answer as a Ray dashboard ("
                            f"{str(exc).splitlines()[0][:200]}); check --address "
                            "(http://HEAD:8265)") from None


def submit(client: JobSubmissionClient, submission: Submission, *,
           submission_id: str | None = None) -> str:
    """Upload the code and config and submit; returns the job's submission id."""
    with cluster_errors(client.get_address()):
        return client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env,
            metadata=submission.metadata,
            submission_id=submission_id,
        )


def job_status(client: JobSubmissionClient, job_id: str) -> str:
    """The job's status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    with cluster_errors(client.get_address()):
        try:
            return str(client.get_job_status(job_id).value)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                raise UserError(f"no job {job_id!r} on {client.get_address()}") from None
            raise


def wait_for_job(
    client: JobSubmissionClient,
    job_id: str,
    *,
    timeout_s: float,
    poll_s: float = DEFAULT_POLL_S,
    on_change: Callable[[str], None] | None = None,
) -> str | None:
    """Poll until the job ends; its final status, or None if `timeout_s` ran out first.

    A dashboard that stops answering for a while (head restart, network blip) does not end
    the wait; it fails only if it is still unreachable when the time is up.
    """
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            status = job_status(client, job_id)
        except ClusterUnreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
            continue
        if status != last and on_change is not None:
            on_change(status)
        last = status
        if status in TERMINAL_STATUSES:
            return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(poll_s, remaining))


def follow_logs(client: JobSubmissionClient, job_id: str, *, timeout_s: float,
                out: TextIO = sys.stdout, ray_info: bool = True) -> bool:
    """Stream the job's logs to `out` until it ends; False if `timeout_s` ran out first.
    Without `ray_info`, the INFO lines of Ray's own logging (runtime env set-up and the
    like, in Ray's format) are left out; the job's own lines all pass."""
    pending = ""  # a line whose end has not arrived yet

    def write(lines: list[str]) -> None:
        for line in lines:
            if ray_info or not RAY_INFO_LINE.match(line):
                out.write(redact(line))
        out.flush()

    async def _tail() -> None:
        nonlocal pending
        async for chunk in client.tail_job_logs(job_id):
            *done, pending = (pending + chunk).split("\n")
            write([f"{line}\n" for line in done])

    async def _bounded() -> bool:
        try:
            await asyncio.wait_for(_tail(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    with cluster_errors(client.get_address()):
        try:
            return asyncio.run(_bounded())
        finally:
            write([pending] if pending else [])
