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

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.contracts.errors import UserError
from pipeline.contracts.spec import JobSpec, load_spec
from pipeline.contracts.spec.paths import get_field
from pipeline.contracts.versions import GIT_COMMIT_ENV, PROJECT_DIR, git_commit
from pipeline.submit.paths import cluster_overrides

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


@dataclass
class Submission:
    """Everything sent to the cluster for one job (built and checked before connecting)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    run_id: str
    output_root: str  # where the job writes, as this machine names it (s3:// or absolute)
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


def _refuse_credentials(overrides: Iterable[str]) -> None:
    for item in overrides:
        # The entrypoint is stored with the job and shown by the dashboard to anyone.
        if _URL_USERINFO.search(item):
            raise UserError(f"--set {item.partition('=')[0]}: the value carries credentials in "
                            "a URL (user:password@); the cluster must get them from its "
                            "own environment or role")


@dataclass
class _Code:
    """How the code and config reach the cluster: runtime_env entries and the config's
    path as the entrypoint sees it."""

    runtime_env: dict[str, Any]
    config_arg: str
    cleanup: list[Path] = field(default_factory=list)
    upload_root: Path | None = None  # the project folder uploaded as the working folder


def _config_only(config: Path, working_dir: str | os.PathLike | None) -> _Code:
    """Image mode: the package is in the cluster's image; upload only the config."""
    if working_dir is not None:
        raise UserError("--working-dir and --image-has-package exclude each other")
    staging = _stage_config(config)
    return _Code({"working_dir": str(staging)}, config.name, [staging])


def _project_root(working_dir: str | os.PathLike | None) -> Path:
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
    return root


def _with_project(config: Path, working_dir: str | os.PathLike | None) -> _Code:
    """Working-dir mode: upload the project folder; a config outside it goes alone, with the
    package folders as py_modules."""
    root = _project_root(working_dir)
    resolved = config.resolve()
    if not resolved.is_relative_to(root):
        staging = _stage_config(config)
        env = {"working_dir": str(staging),
               "py_modules": [str(root / name) for name in PACKAGE_DIRS]}
        return _Code(env, config.name, [staging])
    config_arg = resolved.relative_to(root).as_posix()
    if _upload_skips(root, config_arg):
        raise UserError(
            f"{config_arg} is git-ignored or in an excluded folder, so it would not be "
            "uploaded with the project; move it, or submit a copy kept outside the project "
            "folder (it is then shipped on its own)")
    return _Code({"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}, config_arg,
                 upload_root=root)


def build_submission(
    config: str | os.PathLike,
    *,
    overrides: Iterable[str] = (),
    working_dir: str | os.PathLike | None = None,
    image_has_package: bool = False,
    env: Iterable[str] = (),
    absolute_paths: bool = False,
) -> Submission:
    """Validate the config and assemble the entrypoint and runtime_env for it.

    Relative paths that would not work on the cluster are refused (`pipeline.submit.paths`),
    or sent as this machine's absolute paths with `absolute_paths`.
    """
    config = Path(config)
    overrides = list(overrides)
    _refuse_credentials(overrides)
    spec = validate_config(config, overrides)
    env_vars = job_env_vars(env)
    code = (_config_only(config, working_dir) if image_has_package
            else _with_project(config, working_dir))
    try:
        root = code.upload_root
        paths = cluster_overrides(
            config, overrides, spec, upload_root=root, absolute_paths=absolute_paths,
            uploaded=lambda rel: root is not None and not _upload_skips(root, rel))
    except UserError:
        for folder in code.cleanup:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    # Pin the run date resolved here so the run id printed now is the one the job writes,
    # even if the job starts after midnight UTC.
    overrides = [*overrides, *paths, f"run.run_date={spec.run.run_date.isoformat()}"]
    if code.upload_root == PROJECT_DIR and (commit := git_commit()):
        # The uploaded copy has no .git: tell the job's manifest which code it runs.
        env_vars[GIT_COMMIT_ENV] = commit["commit"] + ("+dirty" if commit["dirty"] else "")
    if env_vars:
        code.runtime_env["env_vars"] = env_vars
    args = ["python", "-m", ENTRY_MODULE, code.config_arg]
    for item in overrides:
        args += ["--set", item]
    return Submission(
        entrypoint=shlex.join(args),
        runtime_env=code.runtime_env,
        metadata={
            "wham_batch_config": config.name,
            "wham_batch_run_id": spec.run.run_id,
            "wham_batch_run_date": spec.run.run_date.isoformat(),
        },
        run_id=spec.run.run_id,
        output_root=get_field(load_spec(config, overrides).model_dump(), "output.root"),
        cleanup=code.cleanup,
    )
