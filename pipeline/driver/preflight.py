"""Everything a run checks before any actor starts, and the Ray connection.

Bad job settings, a missing checkpoint, an unreadable action script, an unwritable output
root, an empty seed folder and a cluster too small for the actors all fail here with a
UserError naming the field or resource (docs/reliability.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pipeline.driver.discovery import discover_seeds, load_action_script
from pipeline.errors import UserError
from pipeline.sources import SeedRef
from pipeline.spec import JobSpec
from pipeline.storage import Storage, open_storage
from workers import wham


@dataclass(slots=True)
class Prepared:
    """What preflight found: the output storage, the seeds and a scripted action table."""

    storage: Storage
    seeds: list[SeedRef]
    script: Any = None  # np.ndarray (N,16) for rollouts.actions.kind == "file"


def check_model_source(spec: JobSpec) -> None:
    src = spec.model.checkpoint
    if src is None:
        if spec.model.preset not in wham.PRESETS:
            raise UserError(f"model.preset: unknown preset {spec.model.preset!r}; "
                            f"choose one of {', '.join(wham.PRESETS)}")
        return
    if src.startswith("s3://"):
        parent, _, name = src.rstrip("/").rpartition("/")
        store = open_storage(parent, endpoint_url=spec.model.endpoint_url,
                             region=spec.model.region)
        if not (store.exists(name) or store.exists(f"{name}/config.json")):
            raise UserError(f"model.checkpoint: {src} not found (no such object or folder)")
    elif not os.path.exists(src):
        raise UserError(f"model.checkpoint: {src} does not exist")


def preflight(spec: JobSpec) -> Prepared:
    """Everything that can fail before an actor starts: model, actions, output, seeds."""
    check_model_source(spec)
    script = None
    if spec.rollouts.actions.kind == "file":
        script = load_action_script(spec.rollouts.actions.path,
                                    endpoint_url=spec.seeds.endpoint_url, region=spec.seeds.region)
    storage = open_storage(spec.output.root, endpoint_url=spec.output.endpoint_url,
                           region=spec.output.region)
    storage.check_writable()
    s = spec.seeds
    seeds = discover_seeds(s.source, format=s.format, glob=s.glob, limit=s.limit,
                           endpoint_url=s.endpoint_url, region=s.region)
    if not seeds:
        raise UserError(f"seeds.source: no seeds found under {s.source} "
                        f"(format {s.format}, glob {s.glob or 'default'})")
    return Prepared(storage=storage, seeds=seeds, script=script)


def check_cluster(spec: JobSpec) -> None:
    """UserError when the connected Ray cluster cannot hold the requested actors."""
    import ray

    res = ray.cluster_resources()
    r = spec.resources
    for kind, per_actor in (("GPU", r.gpus_per_actor), ("CPU", r.cpus_per_actor)):
        have = float(res.get(kind, 0.0))
        need = per_actor * r.actors
        if per_actor > 0 and have + 1e-9 < need:
            fit = int(have // per_actor) if per_actor else 0
            raise UserError(
                f"resources: {r.actors} actors x {per_actor} {kind} = {need:g} {kind}s, but the "
                f"Ray cluster has {have:g}; lower resources.actors (at most {fit} fit) or "
                f"resources.{kind.lower()}s_per_actor")


def connect_ray() -> bool:
    """Connect to RAY_ADDRESS when set, else start a private local instance. True if started."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    return True
