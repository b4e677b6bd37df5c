"""Everything a run checks before any actor starts, and the Ray connection.

Bad job settings, a missing checkpoint, an unreachable model endpoint, an unreadable action
script or one shorter than the rollouts, an unwritable output root, an empty seed folder or
one whose sampled seeds cannot be read, and a cluster too small for the actors all fail here
with a UserError naming the field or resource (docs/reliability.md). `wham-batch validate`
runs the same checks on what it can reach.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import bearer_headers, public_url, redact
from pipeline.contracts.sources import SeedRef
from pipeline.contracts.spec import JobSpec
from pipeline.contracts.storage import Storage, open_storage
from pipeline.driver.discovery import discover_seeds, load_action_script
from workers import wham

log = logging.getLogger("pipeline.driver")

#: Seconds to wait for a named cluster's address to answer (`wham-batch run --connect-timeout`).
CONNECT_TIMEOUT_S = 30.0
GCS_PORT = 6379
RAY_CLIENT_PORT = 10001
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
ENDPOINT_PROBE_TIMEOUT_S = 10.0
#: Seeds read and decoded before any actor starts (the first, a middle and the last).
SEED_SAMPLE = 3
#: Reads and decodes one seed, raising what `workers.actor.inputs.check_seed` raises; the
#: entry point hands it in (the driver side never imports the actor side).
SeedCheck = Callable[..., None]


@dataclass(slots=True)
class Prepared:
    """What preflight found: the output storage, the seeds and a scripted action table."""

    storage: Storage
    seeds: list[SeedRef]
    script: Any = None  # np.ndarray (N,16) for rollouts.actions.kind == "file"


def check_checkpoint(src: str, *, endpoint_url: str | None, region: str | None,
                     field: str = "model.checkpoint") -> None:
    """UserError naming `field` when the checkpoint (local or s3://) is not there."""
    if src.startswith("s3://"):
        parent, _, name = src.rstrip("/").rpartition("/")
        store = open_storage(parent, endpoint_url=endpoint_url, region=region)
        if not (store.exists(name) or store.exists(f"{name}/config.json")):
            raise UserError(f"{field}: {src} not found (no such object or folder)")
    elif not os.path.exists(src):
        raise UserError(f"{field}: {src} does not exist")


def check_preset(name: str, *, field: str = "model.preset") -> None:
    if name not in wham.PRESETS:
        raise UserError(f"{field}: unknown preset {name!r}; choose one of "
                        f"{', '.join(wham.PRESETS)}")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are answers, not followed: urllib would resend the key to the new address
    (any host, even from https to http)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _tracked(cls: type, sockets: list[socket.socket]) -> Callable[..., Any]:
    """A factory of `cls` connections that list their sockets once connected."""
    def make(host: str, **kwargs: Any) -> Any:
        conn = cls(host, **kwargs)
        connect = conn.connect

        def connect_and_list() -> None:
            connect()
            sockets.append(conn.sock)
        conn.connect = connect_and_list
        return conn
    return make


class _Tracked(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's HTTP and HTTPS handlers, with every socket listed so that a deadline can
    shut it: urllib's timeout is per socket operation, and a server that drips its answer
    a byte at a time never lets one time out."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        urllib.request.HTTPHandler.__init__(self)
        urllib.request.HTTPSHandler.__init__(self)
        self.sockets = sockets

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_tracked(http.client.HTTPConnection, self.sockets), req)

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_tracked(http.client.HTTPSConnection, self.sockets), req,
                            context=self._context)


def _shut(sockets: list[socket.socket], expired: threading.Event) -> None:
    expired.set()
    for sock in list(sockets):
        with contextlib.suppress(OSError):  # closed already
            sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked on it


def check_endpoint(url: str, *, api_key_env: str | None, timeout_s: float,
                   trust_env: bool = False) -> None:
    """UserError unless the endpoint's key variable is set and the endpoint answers, all
    within `min(timeout_s, ENDPOINT_PROBE_TIMEOUT_S)` seconds in total.

    The probe is a POST with an empty context: any HTTP answer but 401/403 (the key was
    refused), 404 (nothing at that path) and a redirect (not followed, as actors do not
    follow one) means the endpoint is there; actors find out the rest (frame size, token
    count) with their first real request. It carries the key, so it goes through no proxy
    unless `trust_env` (model.trust_env).
    """
    shown = public_url(url)
    headers = bearer_headers(api_key_env, missing=(
        "export the endpoint's key in that variable (or set model.api_key_env: null for an "
        "endpoint that needs no key)"))
    probe = urllib.request.Request(url, data=b'{"input_data": {"context": []}}',
                                   headers=headers, method="POST")
    sockets: list[socket.socket] = []
    opener = urllib.request.build_opener(
        _NoRedirects, _Tracked(sockets), urllib.request.ProxyHandler(None if trust_env else {}))
    deadline_s, expired = min(timeout_s, ENDPOINT_PROBE_TIMEOUT_S), threading.Event()
    location = None
    timer = threading.Timer(deadline_s, _shut, args=(sockets, expired))
    timer.start()
    try:
        with opener.open(probe, timeout=deadline_s) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        status, location = exc.code, exc.headers.get("Location")
        exc.close()
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = (f"no answer within {deadline_s:g} s" if expired.is_set()
                  else redact(str(getattr(exc, "reason", exc))))
        raise UserError(f"model.endpoint: cannot reach {shown} ({reason}); check the URL and "
                        "that the endpoint is running") from None
    finally:
        timer.cancel()
    if status in (401, 403):
        raise UserError(f"model.api_key_env: {shown} refused the key in {api_key_env} "
                        f"(HTTP {status}); check the key")
    if status == 404:
        raise UserError(f"model.endpoint: {shown} answered 404 (nothing there); use the "
                        "endpoint's scoring URL")
    if 300 <= status < 400:
        target = redact(public_url(location) or "nowhere")
        raise UserError(f"model.endpoint: {shown} answered HTTP {status}, a redirect to "
                        f"{target}; redirects are not followed (the key would go with it): "
                        "set model.endpoint to the final URL")


def check_model_source(spec: JobSpec) -> None:
    m = spec.model
    if m.endpoint is not None:
        check_endpoint(m.endpoint, api_key_env=m.api_key_env, timeout_s=m.timeout_s,
                       trust_env=m.trust_env)
    elif m.checkpoint is None:
        check_preset(m.preset)
    else:
        check_checkpoint(m.checkpoint, endpoint_url=m.endpoint_url, region=m.region)


def preflight(spec: JobSpec, *, check_seed: SeedCheck | None = None) -> Prepared:
    """Everything that can fail before an actor starts: model, actions, output, seeds (a
    sample of them read and decoded with `check_seed`, when given)."""
    check_model_source(spec)
    script = load_script(spec)
    storage = open_storage(spec.output.root, endpoint_url=spec.output.endpoint_url,
                           region=spec.output.region)
    storage.check_writable()
    seeds = find_seeds(spec)
    if check_seed is not None:
        check_seed_sample(spec, seeds, check_seed=check_seed)
    return Prepared(storage=storage, seeds=seeds, script=script)


def load_script(spec: JobSpec) -> Any:
    """The action script of `rollouts.actions.kind: file` (None for other kinds), its
    columns checked and, for world-model rollouts, its length against `rollouts.steps`: a
    shorter script would fail every rollout once the actors run."""
    actions = spec.rollouts.actions
    if actions.kind != "file":
        return None
    script = load_action_script(actions.path, endpoint_url=spec.seeds.endpoint_url,
                                region=spec.seeds.region)
    steps = spec.rollouts.steps
    if spec.rollouts.mode == "world_model" and len(script) < steps:
        raise UserError(f"rollouts.actions.path: the action script {actions.path} has "
                        f"{len(script)} rows, fewer than rollouts.steps={steps}: every rollout "
                        f"would fail; give it at least {steps} rows or lower rollouts.steps")
    return script


def find_seeds(spec: JobSpec) -> list[SeedRef]:
    """The seeds of `seeds.source`; UserError when there are none."""
    s = spec.seeds
    seeds = discover_seeds(s.source, format=s.format, glob=s.glob, limit=s.limit,
                           endpoint_url=s.endpoint_url, region=s.region,
                           max_bytes=int(s.max_file_mb * 2**20))
    if not seeds:
        raise UserError(f"seeds.source: no seeds found under {s.source} "
                        f"(format {s.format}, glob {s.glob or 'default'})")
    return seeds


def check_seed_sample(spec: JobSpec, seeds: list[SeedRef], *, check_seed: SeedCheck) -> None:
    """Read and decode up to SEED_SAMPLE seeds (the first, a middle and the last): UserError
    when none of them can be used (a wrong folder or format fails here, not in every
    rollout); a warning when some cannot (their rollouts fail alone, as always)."""
    s = spec.seeds
    sample = [seeds[i] for i in sorted({0, len(seeds) // 2, len(seeds) - 1})][:SEED_SAMPLE]
    errors = []
    for ref in sample:
        try:
            check_seed(ref, endpoint_url=s.endpoint_url, region=s.region,
                       max_bytes=int(s.max_file_mb * 2**20))
        except UserError as exc:
            errors.append(str(exc))
    if errors and len(errors) == len(sample):
        raise UserError(f"seeds.source: none of the {len(sample)} seeds read as a sample can "
                        f"be used (format {s.format}): {errors[0]}")
    if errors:
        log.warning("%d of %d seeds read as a sample cannot be used (their rollouts will "
                    "fail): %s", len(errors), len(sample), "; ".join(errors))


def check_cluster(spec: JobSpec) -> None:
    """UserError when the connected Ray cluster cannot hold the requested actors.

    CPUs are counted honestly: an actor is a process with a model replica that keeps at
    least one core busy, so a `cpus_per_actor` below 1 counts as 1 here (Ray itself would
    pack 40 actors at 0.01 CPU onto one core and the machine would run out of memory).
    """
    import ray

    res = ray.cluster_resources()
    r = spec.resources
    for kind, per_actor in (("GPU", r.gpus_per_actor), ("CPU", max(r.cpus_per_actor, 1.0))):
        have = float(res.get(kind, 0.0))
        need = per_actor * r.actors
        if per_actor > 0 and have + 1e-9 < need:
            fit = int(have // per_actor) if per_actor else 0
            why = (" (each actor is a process that keeps at least one core busy, so "
                   "cpus_per_actor below 1 counts as 1)"
                   if kind == "CPU" and r.cpus_per_actor < 1 else "")
            raise UserError(
                f"resources: {r.actors} actors x {per_actor:g} {kind} = {need:g} {kind}s{why}, "
                f"but the Ray cluster has {have:g}; lower resources.actors (at most {fit} fit) "
                f"or resources.{kind.lower()}s_per_actor")


@dataclass(frozen=True, slots=True)
class RayConnection:
    """How a run reached Ray: a private local instance it started, or a cluster it joined."""

    started: bool  # True: this process started a private instance and shuts it down
    address: str | None  # the cluster's address; None for a private instance
    reused: bool = False  # Ray was already initialised in this process (tests, notebooks)
    source: str = ""  # where the address came from: --address or RAY_ADDRESS

    def describe(self) -> str:
        import ray

        res = ray.cluster_resources()
        size = f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
        if self.reused:
            return f"using the Ray instance this process already has ({size})"
        if self.started:
            return f"started a private local Ray instance ({size})"
        return f"joined the Ray cluster at {self.address} ({self.source}), {size}"


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """The cluster a run joins and where that came from: `--address`, else RAY_ADDRESS,
    else (None, "") for a private local instance."""
    if address:
        return address.strip(), "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (env, "RAY_ADDRESS") if env else (None, "")


def _host_port(target: str) -> tuple[str, int]:
    """(host, port) of a GCS address (HOST[:6379]) or a Ray Client one (ray://HOST[:10001])."""
    client = target.startswith("ray://")
    rest = target.removeprefix("ray://").rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        host, port = rest, str(RAY_CLIENT_PORT if client else GCS_PORT)
    return host.strip("[]"), int(port)


def _probe(target: str, source: str, timeout_s: float) -> None:
    """UserError unless a TCP connection to the cluster's address opens within timeout_s:
    Ray's own connect retries for many minutes against an address that does not answer."""
    host, port = _host_port(target)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        why = (f"no answer within {timeout_s:g}s" if isinstance(exc, TimeoutError)
               else (exc.strerror or str(exc)).lower())
    raise UserError(
        f"cannot reach the Ray cluster at {target} ({source}): {why}; "
        f"check the address (HEAD:{GCS_PORT} or ray://HEAD:{RAY_CLIENT_PORT}) and that the "
        "cluster is up, or unset it to run on a private local Ray instance")


def connect_ray(address: str | None = None, *,
                timeout_s: float = CONNECT_TIMEOUT_S) -> RayConnection:
    """Join the cluster named by `address` or RAY_ADDRESS, else start a private local
    instance (never an unnamed cluster that happens to run on this machine).

    An address that does not answer fails within `timeout_s` with a UserError, as does a
    dashboard URL (http://HEAD:8265 is for `wham-batch submit`). Ray's own INFO lines and
    its token-auth notice are kept off the terminal.
    """
    import ray

    if ray.is_initialized():
        return RayConnection(started=False, address=None, reused=True)
    target, source = cluster_address(address)
    if target is None or target == "local":
        # Ray turns token auth on for a new local instance (good) and warns each time that
        # it did (noise on every run): keep its secure default, drop the notice.
        logging.getLogger(_RAY_AUTH_LOGGER).setLevel(logging.ERROR)
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)
        return RayConnection(started=True, address=None)
    if target.split("://", 1)[0] in ("http", "https"):
        raise UserError(
            f"{source} {target} is a Ray dashboard (Jobs API) address: `wham-batch run` "
            f"joins a cluster by its GCS address (HEAD:{GCS_PORT}) or Ray Client address "
            f"(ray://HEAD:{RAY_CLIENT_PORT}); to run the job on the cluster itself use "
            f"`wham-batch submit CONFIG --address {target}`")
    if target != "auto":
        _probe(target, source, timeout_s)
        # One connection attempt instead of Ray's default twenty once the port answers.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
    from ray.exceptions import RayError

    try:
        ray.init(address=target, log_to_driver=True, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, RayError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot connect to the Ray cluster at {target} ({source}): {first}"
                        ) from None
    return RayConnection(started=False, address=target, source=source)
