"""Structured log lines that carry the run id and work unit.

Every line is one record: ``2026-11-30T02:00:01Z INFO pipeline.driver run_id=nightly-2026-11-30
unit=u000003 committed unit`` (or one JSON object per line with ``WHAM_LOG_FORMAT=json``), so
logs from the driver and from every actor can be grepped or shipped to a log store and joined
on ``run_id`` and ``unit``.

Code that logs through plain ``logging.getLogger(__name__)`` gets the fields too: a process
sets its run once (``set_log_context(run_id=...)``) and wraps each unit's work in
``with log_context(unit=...)`` (per thread, so concurrent units in one actor stay apart).

Secrets never reach a log line: both formatters replace the values of credential environment
variables (AWS keys, session tokens, the Ray auth token) wherever they appear in a line,
tracebacks included.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pipeline.contracts.secrets import redact

# Record attributes rendered as key=value fields, in this order, when present.
CONTEXT_FIELDS = ("run_id", "unit", "rollout_id", "worker")
LOG_FORMAT_ENV = "WHAM_LOG_FORMAT"
LOG_LEVEL_ENV = "WHAM_LOG_LEVEL"
_HANDLER_MARK = "_wham_batch_handler"


# Process-wide fields (the run, the worker) and per-context ones (the unit being worked on).
_process_context: dict[str, str] = {}
_local_context: ContextVar[Mapping[str, str] | None] = ContextVar("wham_log_context",
                                                                 default=None)


def set_log_context(**fields: str | None) -> None:
    """Fields stamped on every line this process logs from now on (None removes one)."""
    _check_fields(fields)
    for name, value in fields.items():
        if value is None:
            _process_context.pop(name, None)
        else:
            _process_context[name] = value


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Fields stamped on lines logged inside the block, in this thread / task only."""
    _check_fields(fields)
    token = _local_context.set({**(_local_context.get() or {}), **fields})
    try:
        yield
    finally:
        _local_context.reset(token)


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context fields {sorted(unknown)}; use {CONTEXT_FIELDS}")


def context_fields(record: logging.LogRecord) -> dict[str, str]:
    """The record's context fields: its own, else the block's, else the process's."""
    local = _local_context.get() or {}
    out = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is None:
            value = local.get(name, _process_context.get(name))
        if value is not None:
            out[name] = value
    return out


def _utc_timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``<utc time> <LEVEL> <logger> run_id=.. unit=.. <message>`` (logfmt-style fields)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = [f"{name}={_quote(value)}" for name, value in context_fields(record).items()]
        head = " ".join(
            [_utc_timestamp(record.created), record.levelname, record.name, *fields]
        )
        line = f"{head} {record.getMessage()}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the context fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": _utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(context_fields(record))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(payload, ensure_ascii=False))


def setup_logging(*, level: str | int | None = None, fmt: str | None = None) -> None:
    """Send `pipeline`, `workers` and `jobs` loggers to stderr as structured lines.

    `fmt` is "text" (key=value, the default) or "json"; both default from the environment
    (WHAM_LOG_FORMAT, WHAM_LOG_LEVEL) so Ray workers pick up the same settings as the driver.
    Calling it again replaces the handler instead of adding a second one.
    """
    fmt = (fmt or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"{LOG_FORMAT_ENV} must be 'text' or 'json', got {fmt!r}")
    level = level if level is not None else os.environ.get(LOG_LEVEL_ENV, "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    setattr(handler, _HANDLER_MARK, True)
    for name in ("pipeline", "workers", "jobs"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level.upper() if isinstance(level, str) else level)
        logger.propagate = False
