"""`wham-batch serve`: the driver side of the Muse-protocol server on Ray Serve (settings in
`config`, deployment in `app`; the replica itself is `workers.actor.serve_replica`)."""

from __future__ import annotations

from pipeline.serve.app import Deployed, deploy, serve_until_stopped, stop
from pipeline.serve.config import (
    API_KEY_ENV,
    ServeConfig,
    is_loopback,
    load_config,
    resolve_api_key,
)

__all__ = ["API_KEY_ENV", "Deployed", "ServeConfig", "deploy", "is_loopback", "load_config",
           "resolve_api_key", "serve_until_stopped", "stop"]
