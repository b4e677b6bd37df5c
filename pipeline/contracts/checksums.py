"""Content checksums of stored objects: SHA-256, as commit markers record them.

Why SHA-256 (and not CRC32C or CRC64NVME, which S3 also keeps): it is a cryptographic hash,
so a changed or swapped object cannot be made to match by accident or on purpose (a CRC
can be forged by changing four or eight bytes); Python's hashlib computes it at memory
speed with no extra package, and boto3 computes it for S3 uploads without the AWS CRT
(which botocore needs for CRC32C and CRC64NVME). S3 keeps it beside the object
(`ChecksumAlgorithm="SHA256"`) and gives it back on `HeadObject(ChecksumMode="ENABLED")`,
so an S3 root is checked against its markers without downloading.

A multipart upload gets a composite checksum (the SHA-256 of its parts' SHA-256s, shown
with a `-N` part-count suffix), not the object's. The writer records, beside the object's
own SHA-256, the checksum S3 reported when the two differ (`s3`); a stored checksum that
matches neither (an object replaced by another tool, or none kept) is settled by hashing
the bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ALGORITHM = "sha256"
#: Bytes hashed per read when an object is hashed from storage.
HASH_CHUNK_BYTES = 1 << 20
_HEX = re.compile(r"^[0-9a-f]{64}$")
_S3_CHECKSUM = re.compile(r"^[A-Za-z0-9+/]{43}=(-\d{1,5})?$")


@dataclass(frozen=True, slots=True)
class ObjectSum:
    """An object's size and SHA-256 (hex); `s3`: the checksum S3 keeps for it when that is
    not the object's own SHA-256 (a multipart upload's composite)."""

    size: int
    sha256: str
    s3: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"size": self.size, ALGORITHM: self.sha256}
        if self.s3 is not None:
            body["s3"] = self.s3
        return body

    @classmethod
    def from_json(cls, value: object) -> ObjectSum:
        """The sum in a marker's entry; ValueError saying what is wrong with it."""
        if not isinstance(value, Mapping):
            raise ValueError("is not an object")
        size, digest, s3 = value.get("size"), value.get(ALGORITHM), value.get("s3")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"size {size!r:.40} is not a non-negative integer")
        if not isinstance(digest, str) or not _HEX.match(digest):
            raise ValueError(f"{ALGORITHM} {digest!r:.80} is not 64 hex digits")
        if s3 is not None and (not isinstance(s3, str) or not _S3_CHECKSUM.match(s3)):
            raise ValueError(f"s3 checksum {s3!r:.80} is not an S3 SHA-256 checksum")
        return cls(size=size, sha256=digest, s3=s3)

    def describe(self) -> str:
        return f"{self.size} bytes, sha256 {self.sha256[:12]}..."


def sum_of(data: bytes) -> ObjectSum:
    return ObjectSum(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def s3_form(sha256_hex: str) -> str:
    """A SHA-256 as S3 writes it (base64 of the digest)."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def with_s3_checksum(found: ObjectSum, reported: str | None) -> ObjectSum:
    """`found` with the checksum S3 reported on upload kept when it is not the object's own
    (a multipart upload's composite)."""
    if reported is None or reported == s3_form(found.sha256):
        return found
    return ObjectSum(size=found.size, sha256=found.sha256, s3=reported)


def stored_matches(expected: ObjectSum, stored: str) -> bool:
    """Whether the checksum a store keeps (S3's form, maybe with a `-N` part count) is the
    one `expected` records; False means "not shown equal" (hash the bytes to know)."""
    value = stored.split("-", 1)[0]  # base64 has no '-': what follows is the part count
    if expected.s3 is not None and value == expected.s3.split("-", 1)[0]:
        return True
    try:
        return base64.b64decode(value, validate=True).hex() == expected.sha256
    except (binascii.Error, ValueError):
        return False


def hash_stream(stream: Any) -> ObjectSum:
    """Size and SHA-256 of everything `stream` (a readable binary file) yields."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return ObjectSum(size=size, sha256=digest.hexdigest())
