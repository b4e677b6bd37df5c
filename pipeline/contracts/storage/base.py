"""Storage keys and the Storage interface: a root (folder or S3 prefix) of objects.

Keys are '/'-joined paths relative to the storage root. Every key is validated, so a key
built from user input (a seed name, a run id) can never leave the root: no '..' or '.'
segments, no absolute keys, no backslashes, no control characters. `safe_segment` turns an
arbitrary name into a single safe segment.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.contracts.errors import UserError

#: Longest segment `safe_segment` returns (the hash suffix included).
MAX_SEGMENT_CHARS = 96
PROBE_PREFIX = ".wham-batch-write-probe-"


class ObjectTooLarge(UserError):
    """An object larger than the `max_bytes` its reader allows (it was not read whole)."""


def too_large(where: str, size: int, max_bytes: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"{where} is {size / 2**20:.1f} MiB, more than the "
                          f"{max_bytes / 2**20:g} MiB read at most (seeds.max_file_mb)")


def backoff_delay(attempt: int, *, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Seconds to wait before retry number `attempt` (0-based): exponential with jitter,
    so retries of a struggling store spread out instead of landing in the same second."""
    return min(cap_s, base_s * 2 ** max(attempt, 0)) * (0.5 + random.random() / 2)


class TransientStorageError(OSError):
    """Storage failed in a way a later attempt may not (busy, throttled, a dropped connection,
    a conflicting write in flight): the caller retries it with backoff. An OSError, so code
    that retries I/O errors in general retries this one too."""


class StorageFatalError(UserError):
    """Storage refuses writes for a reason a retry cannot fix (full, read-only, no access,
    no bucket, a symlink in the way): the run stops with this message and stays resumable."""


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return `key` if it is a safe relative key, else raise UserError saying why.

    With `prefix=True` the empty string and a trailing '/' are allowed (listing prefixes).
    """
    if not isinstance(key, str):
        raise UserError(f"storage key must be a string, got {type(key).__name__}")
    if prefix and key == "":
        return key
    body = key[:-1] if prefix and key.endswith("/") else key
    problem = None
    if not body:
        problem = "it is empty"
    elif body.startswith("/"):
        problem = "it is absolute"
    elif "\\" in body:
        problem = "it contains a backslash"
    elif any(unicodedata.category(ch).startswith("C") for ch in body):
        problem = "it contains control or non-printing characters"
    elif any(seg in ("", ".", "..") for seg in body.split("/")):
        problem = "it has an empty, '.' or '..' segment"
    if problem:
        raise UserError(f"unsafe storage key {key[:200]!r}: {problem}")
    return key


def safe_segment(name: str) -> str:
    """Turn any name into one safe key segment, deterministically.

    Letters and digits of any script plus '.', '_' and '-' are kept; everything else
    (slashes, spaces, control characters) becomes '_'; runs of dots collapse and leading or
    trailing '.', '_' and '-' are stripped, so the result is never '.', '..' or hidden. When
    anything had to change (or the name is too long) a short hash of the original name is
    appended, so two different names never map to the same segment (e.g. 'a/b' and 'a_b').
    Already-safe names come back unchanged, which makes the function idempotent.
    """
    nfc = unicodedata.normalize("NFC", str(name))
    out = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in nfc)
    out = re.sub(r"_{2,}", "_", re.sub(r"\.{2,}", ".", out)).strip("._-")
    if out and out == name and len(out) <= MAX_SEGMENT_CHARS:
        return out
    digest = hashlib.blake2b(str(name).encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    stem = out[: MAX_SEGMENT_CHARS - len(digest) - 1]
    return f"{stem}-{digest}" if stem else digest


def join_keys(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


@dataclass(frozen=True, slots=True)
class ObjectHead:
    """What a store says of an object without reading it: its size, and the SHA-256
    checksum it keeps beside it (S3's base64 form, a multipart upload's with a `-N` part
    count), or None where it keeps none (a folder, an object uploaded without one)."""

    size: int
    sha256: str | None = None


class Storage(ABC):
    """A root (folder or S3 prefix) holding objects addressed by relative keys."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Write `data` at `key`, replacing any old object; readers see old or new, never half."""

    def put_with_checksum(self, key: str, data: bytes, *,
                          content_type: str | None = None) -> str | None:
        """`put_bytes`, asking the store to keep a SHA-256 checksum beside the object (S3's
        additional checksums); the checksum it reports, or None where it keeps none."""
        self.put_bytes(key, data, content_type=content_type)
        return None

    @abstractmethod
    def head(self, key: str) -> ObjectHead:
        """Size and kept checksum of the object at `key`, without reading it;
        FileNotFoundError if it does not exist."""

    @abstractmethod
    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Read the object at `key`; FileNotFoundError if it does not exist, UserError if it
        is larger than `max_bytes` (then it is not read whole)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at `key`."""

    @abstractmethod
    def list_keys(self, prefix: str = "", *, start_after: str = "") -> Iterator[str]:
        """Relative keys of all objects whose key starts with `prefix`, recursively, sorted;
        only those after `start_after` when given (S3's StartAfter)."""

    @abstractmethod
    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if no object is there; True if this call created it."""

    @abstractmethod
    def get_tagged(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """The object at `key` and its version tag (S3's ETag; locally a digest of the
        bytes), for a later `put_if`/`delete_if`; FileNotFoundError if there is none."""

    @abstractmethod
    def put_if(self, key: str, data: bytes, *, match: str | None) -> str | None:
        """Write `data` at `key` only if the object there still has the version tag `match`
        (with `match=None`: only if there is no object). The new object's tag, or None when
        the condition did not hold: of several writers holding the same tag, one wins."""

    @abstractmethod
    def delete_if(self, key: str, *, match: str) -> bool:
        """Delete the object at `key` only if it still has the version tag `match`."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise UserError naming the root if objects cannot be written there."""

    @abstractmethod
    def arrow_fs(self) -> tuple[Any, str]:
        """A `pyarrow.fs.FileSystem` and the base path of the root inside it."""

    @abstractmethod
    def key_uri(self, key: str) -> str:
        """The full URI (or path) of `key`, for display and for seeds' `uri` fields."""

    @abstractmethod
    def child(self, prefix: str) -> Storage:
        """A storage rooted at `prefix` under this root."""

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    def delete(self, key: str) -> None:
        """Delete the object at `key` if it exists."""
        self._delete(validate_key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many were deleted."""
        keys = list(self.list_keys(prefix))
        for key in keys:
            self._delete(key)
        return len(keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
