"""One `wham-batch serve` of the shipped demo model for every test that needs a server.

Starting Serve takes 5-60 s on a busy 2-core machine, so the server is started once, on
the first test that asks for it, and stopped (by process group) at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.muse import SERVER_KEY, ServeProcess, running_server

#: Small limits the protocol tests reach on purpose: the body limit (413) and the queue (503).
SERVER_ARGS = ["--checkpoint", "models/demo", "--device", "cpu", "--max-batch", "16",
               "--batch-wait-ms", "100", "--max-queue", "2", "--max-body-mb", "1"]


@pytest.fixture(scope="session")
def muse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with running_server(SERVER_ARGS, key=SERVER_KEY,
                        log_dir=tmp_path_factory.mktemp("serve")) as server:
        yield server
