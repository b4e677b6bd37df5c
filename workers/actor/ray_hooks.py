"""What needs Ray below the driver: the metrics backend and the logging of an actor.

The contracts layer knows no Ray; it records metrics through whatever backend a process
installs (`pipeline.contracts.metrics.set_backend`). `install_ray_hooks()` installs the Ray
one: metric objects of `ray.util.metrics`, recording while Ray is initialised. Actors and
Serve replicas call it when they start; the entry points call it in the driver's process
(the driver side is given the actor class and never imports this layer).

Ray is imported when first needed, so installing the hooks costs nothing where Ray never
starts (`wham-batch --help`, `validate`).
"""

from __future__ import annotations

from typing import Any

from pipeline.contracts import metrics
from pipeline.contracts.logs import set_log_context, setup_logging


class RayMetricsBackend:
    """Metrics backend over `ray.util.metrics` (Prometheus on every node)."""

    def active(self) -> bool:
        try:
            import ray
        except ImportError:
            return False
        return ray.is_initialized()

    def make(self, *, kind: str, name: str, description: str, tag_keys: tuple[str, ...],
             boundaries: tuple[float, ...] | None) -> Any:
        from ray.util import metrics as ray_metrics

        if kind == "counter":
            return ray_metrics.Counter(name, description=description, tag_keys=tag_keys)
        if kind == "gauge":
            return ray_metrics.Gauge(name, description=description, tag_keys=tag_keys)
        return ray_metrics.Histogram(name, description=description,
                                     boundaries=list(boundaries or ()), tag_keys=tag_keys)


def install_ray_hooks() -> None:
    """Record this process's metrics to Ray while Ray is up (idempotent)."""
    if not isinstance(metrics._backend, RayMetricsBackend):
        metrics.set_backend(RayMetricsBackend())


def setup_actor_logging(**fields: str) -> None:
    """Inside a Ray actor: structured lines on stderr stamped with `fields` (run_id, worker).

    Elsewhere (an actor class called directly, as tests do) it does nothing, so the host
    process keeps its own logging setup and context.
    """
    try:
        import ray

        inside = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except ImportError:
        inside = False
    if inside:
        setup_logging()
        set_log_context(**fields)
