"""Structured log lines (run id, unit, masked secrets) and the Ray metrics recorder."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import textwrap
import threading

import pytest

from pipeline.contracts.logs import (
    JsonFormatter,
    KeyValueFormatter,
    log_context,
    redact,
    set_log_context,
    setup_logging,
)
from pipeline.contracts.metrics import Metrics


def _record(logger: logging.Logger, msg: str, *args: object, **extra: str) -> logging.LogRecord:
    records: list[logging.LogRecord] = []

    me = threading.get_ident()

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == me:  # other threads may log through the same logger meanwhile
                records.append(record)

    handler = Grab()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info(msg, *args, extra=extra or None)
    finally:
        logger.removeHandler(handler)
    (record,) = records
    return record


def test_lines_carry_run_and_unit() -> None:
    log = logging.getLogger("pipeline.test_logs")
    record = _record(log, "committed %d rollouts", 4, run_id="nightly-2026-11-30",
                     unit="u000007")
    line = KeyValueFormatter().format(record)
    assert line.endswith(
        "INFO pipeline.test_logs run_id=nightly-2026-11-30 unit=u000007 committed 4 rollouts")
    payload = json.loads(JsonFormatter().format(record))
    assert payload["run_id"] == "nightly-2026-11-30" and payload["unit"] == "u000007"
    assert payload["message"] == "committed 4 rollouts"
    # Per-call fields win over the block's; unknown context fields are refused.
    with log_context(unit="u000002"):
        record = _record(log, "x", unit="u000001")
    assert "unit=u000001" in KeyValueFormatter().format(record)
    with pytest.raises(ValueError, match="unknown log context"), log_context(shard="3"):
        pass


def test_plain_loggers_get_process_and_unit_context() -> None:
    plain = logging.getLogger("pipeline.plain")
    set_log_context(run_id="r-ctx", worker="actor-002")
    try:
        lines: dict[str, str] = {}

        def unit(unit_id: str, go: threading.Barrier) -> None:
            with log_context(unit=unit_id):
                go.wait(timeout=10)  # both threads are inside their blocks at once
                lines[unit_id] = KeyValueFormatter().format(_record(plain, "working"))

        go = threading.Barrier(2)
        threads = [threading.Thread(target=unit, args=(u, go)) for u in ("u000001", "u000002")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert sorted(lines) == ["u000001", "u000002"]
        for unit_id, line in lines.items():
            assert f"run_id=r-ctx unit={unit_id} worker=actor-002 working" in line
        outside = KeyValueFormatter().format(_record(plain, "idle"))
        assert "unit=" not in outside and "run_id=r-ctx" in outside
        # A record's own field wins over the context.
        assert "run_id=other" in KeyValueFormatter().format(_record(plain, "x", run_id="other"))
    finally:
        set_log_context(run_id=None, worker=None)
    assert "run_id" not in KeyValueFormatter().format(_record(plain, "after"))


def test_values_with_spaces_are_quoted() -> None:
    record = _record(logging.getLogger("pipeline.q"), "m", run_id="a b")
    assert 'run_id="a b"' in KeyValueFormatter().format(record)


def test_secret_values_are_masked_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123456")
    assert redact(f"key={secret} token=tok-123456") == "key=*** token=***"
    log = logging.getLogger("pipeline.test_secrets")
    try:
        raise RuntimeError(f"bad credentials {secret}")
    except RuntimeError:
        records: list[str] = []

        class Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(KeyValueFormatter().format(record))
                records.append(JsonFormatter().format(record))

        grab = Grab()
        log.addHandler(grab)
        try:
            log.exception("upload failed with %s", secret, extra={"run_id": "r1"})
        finally:
            log.removeHandler(grab)
    assert len(records) == 2
    for text in records:
        assert secret not in text and "***" in text and "Traceback" in text


def test_setup_logging_installs_one_handler(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WHAM_LOG_FORMAT", "json")
    loggers = [logging.getLogger(name) for name in ("pipeline", "workers", "jobs")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    setup_logging(level="INFO")
    setup_logging(level="INFO")
    try:
        marked = [h for h in loggers[0].handlers if getattr(h, "_wham_batch_handler", False)]
        assert len(marked) == 1
        logging.getLogger("pipeline.driver").info("hello", extra={"run_id": "r9"})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["run_id"] == "r9"
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
    with pytest.raises(ValueError, match="WHAM_LOG_FORMAT"):
        setup_logging(fmt="xml")


def test_metrics_are_noops_outside_ray_and_picklable() -> None:
    # A fresh interpreter, so no Ray instance from another test is around.
    code = textwrap.dedent("""
        import sys
        from pipeline.contracts import metrics
        m = metrics.Metrics("r1", worker="w")
        m.record_frames(3); m.record_rollouts(ok=1, failed=1)
        m.record_tokens_per_second(tokens=10, seconds=1.0); m.record_upload_latency(0.1)
        m.set_units_in_flight(2); m.record_unit_committed()
        storage = object()
        assert m.timed(storage) is storage
        assert metrics._registry == {}, metrics._registry
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    clone = pickle.loads(pickle.dumps(Metrics("r2", worker="actor-001")))
    assert (clone.run_id, clone.worker) == ("r2", "actor-001")


def test_actor_logging_only_inside_ray_actors(ray_local: None) -> None:
    import ray

    # Workers cannot import this test module: ship its code by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class LoggingProbe:
        """A stand-in actor that sets up logging the way RolloutActor does."""

        def __init__(self) -> None:
            from workers.actor.ray_hooks import setup_actor_logging

            setup_actor_logging(run_id="r-actor", worker="actor-007")

        def line(self) -> tuple[bool, str]:
            logger = logging.getLogger("pipeline")
            installed = any(getattr(h, "_wham_batch_handler", False) for h in logger.handlers)
            with log_context(unit="u000003"):
                plain = logging.getLogger("workers.actor.actor")
                return installed, KeyValueFormatter().format(_record(plain, "batch done"))

    actor = ray.remote(num_cpus=0)(LoggingProbe).remote()
    try:
        installed, line = ray.get(actor.line.remote(), timeout=60)
    finally:
        ray.kill(actor)
    assert installed
    assert "run_id=r-actor unit=u000003 worker=actor-007 batch done" in line
    # Called directly (not as an actor) it leaves this process's logging alone: whatever
    # handlers earlier commands in this process installed stay exactly as they were.
    handlers_before = list(logging.getLogger("pipeline").handlers)
    _, line = LoggingProbe().line()
    assert logging.getLogger("pipeline").handlers == handlers_before
    assert "run_id=r-actor" not in line
