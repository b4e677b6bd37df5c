"""Where seeds and outputs live: a local folder or an S3 prefix, behind one small interface.

`open_storage(uri)` picks the implementation; `read_uri` reads one object by full URI. See
`base` for the key rules every implementation enforces.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pipeline.contracts.errors import UserError
from pipeline.contracts.storage.base import (
    MAX_SEGMENT_CHARS,
    ObjectHead,
    Storage,
    StorageFatalError,
    TransientStorageError,
    backoff_delay,
    join_keys,
    safe_segment,
    validate_key,
)
from pipeline.contracts.storage.local import LocalStorage, read_file
from pipeline.contracts.storage.s3 import (
    MULTIPART_THRESHOLD,
    S3Storage,
    check_s3_endpoint,
    split_s3_uri,
)

__all__ = [
    "MAX_SEGMENT_CHARS",
    "MULTIPART_THRESHOLD",
    "LocalStorage",
    "ObjectHead",
    "S3Storage",
    "Storage",
    "StorageFatalError",
    "TransientStorageError",
    "backoff_delay",
    "check_s3_endpoint",
    "join_keys",
    "open_storage",
    "read_uri",
    "safe_segment",
    "split_s3_uri",
    "validate_key",
]


def open_storage(
    uri: str | os.PathLike[str], *, endpoint_url: str | None = None, region: str | None = None
) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else -> LocalStorage of that folder."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        bucket, prefix = split_s3_uri(text)
        return S3Storage(bucket, prefix, endpoint_url=endpoint_url, region=region)
    if "://" in text:
        raise UserError(f"unsupported storage URI {text!r}: use a local path or s3://bucket/prefix")
    return LocalStorage(text)


@lru_cache(maxsize=16)
def _bucket_storage(bucket: str, endpoint_url: str | None, region: str | None) -> S3Storage:
    # One client per bucket and endpoint per process: creating boto3 clients is slow.
    return S3Storage(bucket, endpoint_url=endpoint_url, region=region)


def read_uri(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
             max_bytes: int | None = None) -> bytes:
    """Read one object by full URI (`s3://bucket/key`) or local path; UserError if it is
    larger than `max_bytes` (then it is not read whole)."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        if not key:
            raise UserError(f"{uri!r} names a bucket, not an object")
        return _bucket_storage(bucket, endpoint_url, region).get_bytes(key, max_bytes=max_bytes)
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"no file {uri!r}")
    return read_file(path, max_bytes=max_bytes)
