"""One WHAM replica on this process: where it runs, where its weights come from, how many
rollouts it decodes at once. Used by the pipeline's actors and by `wham-batch dream`.

torch is imported where a replica is built, not when this module is imported, so commands
that never build one (validate, query, submit) start quickly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Any

from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from workers import wham


def resolve_device(device: str, dtype: str | None) -> tuple[Any, Any]:
    """(torch.device, torch.dtype) for a device name ('auto', 'cpu', 'cuda', 'cuda:N') and a
    dtype name (None or 'auto': bfloat16 on CUDA, float32 elsewhere)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available on this machine; use cpu")
    name = dtype if dtype not in (None, "auto") else (
        "bfloat16" if dev.type == "cuda" else "float32")
    return dev, getattr(torch, name)


def _cache_dir() -> str:
    """The checkpoint cache folder (WHAM_CACHE_DIR, or one per user in the temp folder),
    created private (0o700); UserError if another user owns it, since whoever owns it
    could swap the weights this process loads."""
    default = os.path.join(tempfile.gettempdir(), f"wham-cache-{os.getuid()}")
    cache = os.environ.get("WHAM_CACHE_DIR") or default
    try:
        os.makedirs(cache, mode=0o700, exist_ok=True)
        owners = {os.lstat(cache).st_uid, os.stat(cache).st_uid}  # a link and its target
    except OSError as exc:
        raise UserError(f"checkpoint cache folder {cache}: {exc.strerror or exc}; set "
                        "WHAM_CACHE_DIR to a folder of your own") from None
    if owners != {os.getuid()}:
        raise UserError(f"checkpoint cache folder {cache} belongs to another user; refusing "
                        "to load weights from it. Set WHAM_CACHE_DIR to a folder of your own")
    return cache


def fetch_checkpoint(uri: str, *, endpoint_url: str | None, region: str | None) -> str:
    """A local path for `uri`; s3:// objects or folders are streamed into a cache folder.

    Several actors on one node may fetch the same checkpoint at once: each copies into its
    own temporary name, and the first rename wins; the others find it there and use it."""
    if not uri.startswith("s3://"):
        return uri
    import pyarrow.fs as pafs

    parent, _, name = uri.rstrip("/").rpartition("/")
    fs, base = open_storage(parent, endpoint_url=endpoint_url, region=region).arrow_fs()
    dest = os.path.join(_cache_dir(), hashlib.sha256(uri.encode()).hexdigest()[:16], name)
    if not os.path.exists(dest):
        tmp = f"{dest}.partial-{os.getpid()}"
        src = f"{base}/{name}"
        is_folder = fs.get_file_info(src).type == pafs.FileType.Directory
        os.makedirs(tmp if is_folder else os.path.dirname(dest), mode=0o700, exist_ok=True)
        pafs.copy_files(src, tmp, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        _publish(tmp, dest)
    return dest


def _publish(tmp: str, dest: str) -> None:
    """Rename the finished copy `tmp` to `dest`; when another process got there first (a
    folder cannot replace a non-empty one), keep theirs and drop this copy."""
    try:
        os.replace(tmp, dest)
    except OSError:
        if not os.path.exists(dest):
            raise
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def load_replica(*, checkpoint: str | None, preset: str | None, device: str,
                 dtype: str | None, seed: int = 0, threads: int | None = None,
                 endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A WHAMModel from a checkpoint (local or s3://) or a named preset with random weights.

    `threads` caps torch's CPU threads (never more than the cores this process may use:
    more threads than cores thrash).
    """
    dev, dt = resolve_device(device, dtype)
    if dev.type == "cpu" and threads:
        wham.set_cpu_threads(max(1, int(threads)))
    if preset is not None:
        return wham.random_model(preset, seed=seed, device=dev, dtype=dt)
    path = fetch_checkpoint(checkpoint, endpoint_url=endpoint_url, region=region)
    return wham.load_model(path, device=dev, dtype=dt)


def batch_size_for(model: Any, requested: int | str) -> int:
    """`requested`, or for 'auto' the largest batch whose KV cache fits in free accelerator
    memory (a fixed default on the CPU)."""
    return wham.auto_batch_size(model) if requested == "auto" else int(requested)
