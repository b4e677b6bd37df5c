"""Submitting job YAMLs to a Ray cluster (`packaging`: what is sent; `jobs`: the Jobs API)."""

from __future__ import annotations

from pipeline.submit.jobs import (
    DEFAULT_POLL_S,
    REQUEST_TIMEOUT_S,
    TERMINAL_STATUSES,
    ClusterUnreachable,
    auth_headers,
    cluster_errors,
    connect,
    follow_logs,
    job_status,
    resolve_address,
    submit,
    wait_for_job,
)
from pipeline.submit.packaging import (
    ENTRY_MODULE,
    PACKAGE_DIRS,
    PASSTHROUGH_ENV,
    WORKING_DIR_EXCLUDES,
    Submission,
    build_submission,
    find_project_root,
    is_secret_name,
    job_env_vars,
    validate_config,
)

__all__ = [
    "DEFAULT_POLL_S",
    "ENTRY_MODULE",
    "PACKAGE_DIRS",
    "PASSTHROUGH_ENV",
    "REQUEST_TIMEOUT_S",
    "TERMINAL_STATUSES",
    "WORKING_DIR_EXCLUDES",
    "ClusterUnreachable",
    "Submission",
    "auth_headers",
    "build_submission",
    "cluster_errors",
    "connect",
    "find_project_root",
    "follow_logs",
    "is_secret_name",
    "job_env_vars",
    "job_status",
    "resolve_address",
    "submit",
    "validate_config",
    "wait_for_job",
]
