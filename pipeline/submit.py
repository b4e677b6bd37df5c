"""Submit job YAMLs to a Ray cluster through the Ray Jobs API, and watch them.

A submission is `python -m jobs.run CONFIG --set ...` run by the cluster's job supervisor.
The spec is validated here first, so a bad YAML never reaches the cluster. Two ways to get
the code there:

- working-dir mode (default): the project folder is uploaded as the job's `working_dir`
  (without .venv, .git, out/ and caches); a config inside it is referenced by its relative
  path, a config outside it is shipped alone with the package folders as `py_modules`.
- image mode (`image_has_package=True`): the cluster's image already has the package
  installed (infra/Dockerfile); only the config file is uploaded.

Credentials never go into the runtime_env: the cluster reads S3 credentials from its own
environment, instance profile or IRSA role. Only an allow-list of non-secret variables
(region, S3 endpoint, log settings) and variables named with `env` are passed, and names
that look like secrets are refused.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pipeline.errors import UserError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from pipeline.spec import JobSpec

ENTRY_MODULE = "jobs.run"
# Package folders shipped as py_modules when the config lives outside the project folder.
PACKAGE_DIRS = ("pipeline", "workers", "jobs")
WORKING_DIR_EXCLUDES = (
    ".venv",
    ".git",
    "out",
    "**/__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
)
# Non-secret settings the job needs to reach the same storage the way the user does.
PASSTHROUGH_ENV = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "WHAM_LOG_FORMAT",
    "WHAM_LOG_LEVEL",
)
_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|SESSION|AUTH",
    re.IGNORECASE,
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# scheme://user:password@host -- credentials embedded in a URL.
_URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# (connect, read) seconds for each call to the dashboard; Ray's client has no default.
REQUEST_TIMEOUT_S = (10.0, 120.0)
DEFAULT_POLL_S = 2.0


@dataclass
class Submission:
    """Everything sent to the cluster for one job (built and checked before connecting)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    run_id: str
    # Temporary folders to delete once the upload is done.
    cleanup: list[Path] = field(default_factory=list)

    def remove_staging(self) -> None:
        for folder in self.cleanup:
            shutil.rmtree(folder, ignore_errors=True)
        self.cleanup.clear()


def is_secret_name(name: str) -> bool:
    """True for environment variable names that look like credentials."""
    return bool(_SECRET_NAME.search(name))


def job_env_vars(extra: Iterable[str] = (), *, environ: dict[str, str] | None = None
                 ) -> dict[str, str]:
    """The env vars for the job: the non-secret allow-list plus `NAME` / `NAME=VALUE` items.

    A bare `NAME` copies the local value. Secret-looking names are refused: the cluster
    must get credentials from its own environment or role.
    """
    environ = dict(os.environ if environ is None else environ)
    env = {name: environ[name] for name in PASSTHROUGH_ENV if environ.get(name)}
    for item in extra:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not _ENV_NAME.match(name):
            raise UserError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if is_secret_name(name):
            raise UserError(
                f"--env {name}: refusing to send a secret-looking variable with the job; "
                "give the cluster its credentials through its own environment, instance "
                "profile or IRSA role"
            )
        if not sep:
            if name not in environ:
                raise UserError(f"--env {name}: not set in this environment")
            value = environ[name]
        env[name] = value
    return env


def find_project_root(start: Path) -> Path | None:
    """The nearest folder at or above `start` holding the wham-batch pyproject.toml."""
    for folder in (start, *start.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and re.search(
            r'^name\s*=\s*"wham-batch"', pyproject.read_text(errors="replace"), re.MULTILINE
        ):
            return folder
    return None


def validate_config(config: Path, overrides: Iterable[str]) -> JobSpec:
    """Load and validate the spec locally; UserError lists every bad field by its path."""
    from pipeline.spec import load_spec

    return load_spec(config, list(overrides))


def _upload_skips(root: Path, rel: str) -> bool:
    """True if Ray would leave `rel` out of the working_dir upload (excluded or git-ignored)."""
    first = rel.split("/", 1)[0]
    if first in WORKING_DIR_EXCLUDES or rel.endswith(".pyc"):
        return True
    if not (root / ".git").exists() or shutil.which("git") is None:
        return False
    try:
        check = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", rel],
                               capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return check.returncode == 0


def _stage_config(config: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="wham-submit-"))
    shutil.copy2(config, staging / config.name)
    return staging


def build_submission(
    config: str | os.PathLike,
    *,
    overrides: Iterable[str] = (),
    working_dir: str | os.PathLike | None = None,
    image_has_package: bool = False,
    env: Iterable[str] = (),
) -> Submission:
    """Validate the config and assemble the entrypoint and runtime_env for it."""
    config = Path(config)
    overrides = list(overrides)
    for item in overrides:
        # The entrypoint is stored with the job and shown by the dashboard to anyone.
        if _URL_USERINFO.search(item):
            raise UserError(f"--set {item.partition('=')[0]}: the value carries credentials in "
                            "a URL (user:password@); the cluster must get them from its "
                            "own environment or role")
    spec = validate_config(config, overrides)
    # Pin the run date resolved here so the run id printed now is the one the job writes,
    # even if the job starts after midnight UTC.
    overrides = [*overrides, f"run.run_date={spec.run.run_date.isoformat()}"]
    env_vars = job_env_vars(env)
    runtime_env: dict[str, Any] = {}
    cleanup: list[Path] = []
    if image_has_package:
        if working_dir is not None:
            raise UserError("--working-dir and --image-has-package exclude each other")
        staging = _stage_config(config)
        cleanup.append(staging)
        runtime_env["working_dir"] = str(staging)
        config_arg = config.name
    else:
        root = Path(working_dir) if working_dir else find_project_root(Path.cwd())
        if root is None:
            raise UserError(
                "no wham-batch project folder here: pass --working-dir PROJECT_DIR, or "
                "--image-has-package if the cluster's image has wham-batch installed"
            )
        root = root.resolve()
        missing = [name for name in PACKAGE_DIRS if not (root / name / "__init__.py").is_file()]
        if missing:
            raise UserError(f"--working-dir {root}: not a wham-batch project (missing "
                            f"{', '.join(missing)}/__init__.py)")
        resolved = config.resolve()
        if resolved.is_relative_to(root):
            config_arg = resolved.relative_to(root).as_posix()
            if _upload_skips(root, config_arg):
                raise UserError(
                    f"{config_arg} is git-ignored or in an excluded folder, so it would not "
                    "be uploaded with the project; move it, or submit a copy kept outside "
                    "the project folder (it is then shipped on its own)")
            runtime_env["working_dir"] = str(root)
            runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
        else:
            staging = _stage_config(config)
            cleanup.append(staging)
            runtime_env["working_dir"] = str(staging)
            runtime_env["py_modules"] = [str(root / name) for name in PACKAGE_DIRS]
            config_arg = config.name
    if env_vars:
        runtime_env["env_vars"] = env_vars
    args = ["python", "-m", ENTRY_MODULE, config_arg]
    for item in overrides:
        args += ["--set", item]
    return Submission(
        entrypoint=shlex.join(args),
        runtime_env=runtime_env,
        metadata={
            "wham_batch_config": config.name,
            "wham_batch_run_id": spec.run.run_id,
            "wham_batch_run_date": spec.run.run_date.isoformat(),
        },
        run_id=spec.run.run_id,
        cleanup=cleanup,
    )


def auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Bearer header for Ray token authentication, read the way Ray itself reads it.

    With RAY_AUTH_MODE=token (or a token given explicitly) the token comes from
    RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
    With RAY_AUTH_MODE=disabled or nothing set, no header is sent.
    """
    environ = dict(os.environ if environ is None else environ)
    mode = environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({exc})") from None
    if not token and mode == "token":
        default = Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text().strip()
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
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 "
                        "(the Ray dashboard) or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


class ClusterUnreachable(UserError):
    """The dashboard did not answer (refused, timed out); may be temporary."""


@contextmanager
def cluster_errors(address: str) -> Iterator[None]:
    """Turn connection and authentication failures into UserErrors that say what to do."""
    import requests
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


def connect(address: str | None) -> JobSubmissionClient:
    """A Jobs API client for `address` (with the auth token when token auth is on)."""
    address = resolve_address(address)
    headers = auth_headers()
    with cluster_errors(address):
        return _client_class()(address, headers=headers or None)


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
                out: TextIO = sys.stdout) -> bool:
    """Stream the job's logs to `out` until it ends; False if `timeout_s` ran out first."""

    from pipeline.logs import redact

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(redact(chunk))
            out.flush()

    async def _bounded() -> bool:
        try:
            await asyncio.wait_for(_tail(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    with cluster_errors(client.get_address()):
        return asyncio.run(_bounded())
