"""The serving app: one Ray Serve deployment of model replicas behind Serve's HTTP proxy.

`deploy` checks the model source and the cluster, starts Serve's proxy on the configured
host and port, and runs the application; `serve_until_stopped` keeps it up until SIGINT or
SIGTERM. The replica class is given (`workers.actor.serve_replica.MuseReplica` from the entry
point); the driver side never imports the actor side. So is the job board of the official
local-server protocol (`workers.actor.jobboard.JobBoard`): it runs as a second deployment
of one small replica (no model), whose handle every model replica gets, so the jobs' state
is shared by all replicas and outlives any one of them.

Backpressure has two lines: a replica answers 503 (JSON, Retry-After) once `max_batch +
max_queue` requests wait on it, and Serve's proxy answers 503 (Retry-After) once its own
queue (every request passes through it briefly while a replica is chosen) holds
`PROXY_QUEUE_FACTOR` times what the replicas admit.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import hide_secret_env
from pipeline.driver.preflight import check_checkpoint, check_preset, connect_ray
from pipeline.serve.config import API_KEY_ENV, ONGOING_HEADROOM, ServeConfig

log = logging.getLogger("pipeline.serve")
#: Tries of a replica's constructor before the deployment is failed (a bad model will not
#: load on the third try either).
CONSTRUCTOR_TRIES = 2
PROXY_QUEUE_FACTOR = 4
#: Calls the job board takes at once: a claim from each replica (waiting up to a second
#: for work) and the clients' job requests, which are quick.
BOARD_ONGOING = 1024


@dataclass(frozen=True, slots=True)
class Deployed:
    url: str
    started_ray: bool
    metrics_url: str | None  # this node's Prometheus endpoint, when Ray exports one


def replica_options(config: ServeConfig) -> dict[str, Any]:
    """`serve.deployment` options: resources, batching room and backpressure."""
    from ray.serve.config import BackpressureConfig

    return {
        "name": "MuseReplica",
        "num_replicas": config.replicas,
        "ray_actor_options": {"num_cpus": config.cpus_per_replica,
                              "num_gpus": config.gpus_per_replica},
        "max_ongoing_requests": config.max_batch + config.max_queue + ONGOING_HEADROOM,
        "max_queued_requests": PROXY_QUEUE_FACTOR * config.replicas * (
            config.max_batch + config.max_queue + ONGOING_HEADROOM),
        "backpressure_config": BackpressureConfig(retry_after_s=config.retry_after_s),
        "max_constructor_retry_count": CONSTRUCTOR_TRIES,
    }


def replica_kwargs(config: ServeConfig, *, api_key_sha256: str | None) -> dict[str, Any]:
    """The replica's constructor arguments (`load_config` made a local checkpoint path
    absolute: replicas run in other working folders)."""
    return {"checkpoint": config.checkpoint, "preset": config.preset, "device": config.device,
            "dtype": config.dtype, "decoding": config.decoding,
            "threads": max(1, int(config.cpus_per_replica)),
            "max_batch": config.max_batch, "batch_wait_s": config.batch_wait_ms / 1000,
            "max_queue": config.max_queue, "retry_after_s": config.retry_after_s,
            "max_body_bytes": config.max_body_bytes, "watermark": config.watermark,
            "api_key_sha256": api_key_sha256, "job_limits": config.job_limits()}


def board_app(config: ServeConfig, board_cls: type) -> Any:
    """The job board's deployment, bound (one replica, no model, no resources to speak of)."""
    from ray import serve

    options = {"name": "OfficialJobs", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0},
               "max_ongoing_requests": BOARD_ONGOING,
               "max_constructor_retry_count": CONSTRUCTOR_TRIES,
               # every replica claims work about once a second: no access log line for that
               "logging_config": {"enable_access_log": False}}
    return serve.deployment(**options)(board_cls).bind(
        max_concurrent_jobs=config.max_concurrent_jobs,
        max_job_lifespan_s=config.max_job_lifespan_s, lease_s=config.job_lease_s)


def check_resources(config: ServeConfig) -> None:
    """UserError when the connected Ray cluster cannot hold the replicas."""
    import ray

    have = ray.cluster_resources()
    for kind, per in (("GPU", config.gpus_per_replica), ("CPU", config.cpus_per_replica)):
        need = per * config.replicas
        if per > 0 and float(have.get(kind, 0.0)) + 1e-9 < need:
            raise UserError(f"{config.replicas} replicas x {per:g} {kind} = {need:g} {kind}s, "
                            f"but the Ray cluster has {have.get(kind, 0.0):g}; lower --replicas "
                            f"or --{kind.lower()}s-per-replica")


def serve_logging(*, verbose: bool) -> dict[str, Any]:
    """Serve's own logging (controller, proxies, replicas, and this process, whose Serve
    logger is set to INFO when Serve is imported): INFO lines and a line per request only
    when `verbose`; warnings and errors (a replica that will not start) always."""
    level = "INFO" if verbose else "WARNING"
    logging.getLogger("ray.serve").setLevel(level)
    return {"log_level": level, "enable_access_log": verbose}


def deploy(config: ServeConfig, *, replica_cls: type, api_key_sha256: str | None,
           board_cls: type | None = None, verbose: bool = False) -> Deployed:
    """Start (or join) Ray, check it can hold the replicas, and run the application (with
    the job board of the official protocol when `board_cls` is given)."""
    from ray import serve

    if config.checkpoint is not None:
        check_checkpoint(config.checkpoint, endpoint_url=config.endpoint_url,
                         region=config.region, field="checkpoint")
    else:
        check_preset(config.preset, field="preset")
    # The replicas hold only the key's digest: the key leaves this process's environment
    # before Ray starts here, or every Ray process (replicas included) would inherit it.
    hide_secret_env(API_KEY_ENV)
    started = connect_ray(config.address).started
    try:
        check_resources(config)
        logging_config = serve_logging(verbose=verbose)
        serve.start(http_options={"host": config.host, "port": config.port},
                    logging_config=logging_config)
        kwargs = replica_kwargs(config, api_key_sha256=api_key_sha256)
        if board_cls is not None:
            kwargs["jobs"] = board_app(config, board_cls)
        app = serve.deployment(**replica_options(config))(replica_cls).bind(**kwargs)
        serve.run(app, name=config.name, route_prefix="/", blocking=False,
                  logging_config=logging_config)
    except RuntimeError as exc:  # Serve reports a replica that would not start this way
        stop(config, started_ray=started)
        raise UserError(f"the model replicas did not start ({str(exc).strip()[-500:]}); the "
                        "replica's own error is in the log lines above") from None
    except BaseException:
        stop(config, started_ray=started)
        raise
    return Deployed(url=config.public_url(), started_ray=started, metrics_url=_metrics_url())


def _metrics_url() -> str | None:
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)
    port = getattr(node, "metrics_export_port", None)
    return f"http://127.0.0.1:{port}/metrics" if port else None


def stop(config: ServeConfig, *, started_ray: bool) -> None:
    """Take the application down; on a Ray instance this process started, Ray too."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(config.name)
    finally:
        if started_ray:
            ray.shutdown()


def serve_until_stopped(config: ServeConfig, deployed: Deployed) -> None:
    """Block until SIGINT or SIGTERM, then take the application down."""
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(timeout=1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopping %s", deployed.url)
        stop(config, started_ray=deployed.started_ray)
