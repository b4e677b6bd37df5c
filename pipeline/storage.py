"""Where seeds and outputs live: a local folder or an S3 prefix, behind one small interface.

Keys are '/'-joined paths relative to the storage root. Every key is validated, so a key
built from user input (a seed name, a run id) can never leave the root: no '..' or '.'
segments, no absolute keys, no backslashes, no control characters. `safe_segment` turns an
arbitrary name into a single safe segment.

Storage objects are small and picklable (Ray ships them to actors); an S3 client is created
lazily in each process. Credentials come from the environment or AWS profiles through boto3
and pyarrow's own lookup; they are never stored here, shown in `uri`/`repr` or put into
error messages.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
import unicodedata
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import UserError

#: Longest segment `safe_segment` returns (the hash suffix included).
MAX_SEGMENT_CHARS = 96
#: Objects at least this large go through boto3's multipart transfer.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_PROBE_PREFIX = ".wham-batch-write-probe-"


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


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class Storage(ABC):
    """A root (folder or S3 prefix) holding objects addressed by relative keys."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Write `data` at `key`, replacing any old object; readers see old or new, never half."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read the object at `key`; FileNotFoundError if it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at `key`."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Relative keys of all objects whose key starts with `prefix`, recursively, sorted."""

    @abstractmethod
    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if no object is there; True if this call created it."""

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

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many were deleted."""
        keys = list(self.list_keys(prefix))
        for key in keys:
            self._delete(key)
        return len(keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStorage(Storage):
    """A local folder; writes go to a temporary file that is renamed into place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _write_temp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            tmp.write_bytes(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object {key!r} under {self.uri}")
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, prefix=True)
        # Walk only the deepest folder the prefix names; the rest is a string prefix, as on S3.
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return
        keys = []
        for dirpath, _dirnames, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # an in-flight atomic write
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        # Whole-key order, as S3 lists (a folder walk would put 'ab' before 'a/b').
        yield from sorted(keys)

    def create_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            # A hard link publishes the complete file atomically and fails if the name exists.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # File systems without hard links: exclusive create (not atomic for readers).
            try:
                with open(path, "xb") as fh:
                    fh.write(data)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check_writable(self) -> None:
        probe = self.root / f"{_PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"output folder {self.uri} is not writable ({exc.strerror or exc}); "
                "choose another output root or fix its permissions"
            ) from None

    def arrow_fs(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), self.root.as_posix()

    def key_uri(self, key: str) -> str:
        return str(self._path(key))

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._path(prefix))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); UserError for a malformed URI or bucket name."""
    if not uri.startswith("s3://"):
        raise UserError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_NAME.match(bucket):
        raise UserError(f"invalid S3 bucket name {bucket!r} in {uri!r}")
    prefix = prefix.strip("/")
    if prefix:
        validate_key(prefix)
    return bucket, prefix


def _without_userinfo(url: str | None) -> str | None:
    """The URL without any user:password part: boto3 signs with real credentials, so a
    password in the endpoint is useless and must never be shown or pickled."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6 literal
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def _display_endpoint(endpoint_url: str | None) -> str:
    return _without_userinfo(endpoint_url) or "AWS default endpoint"


class S3Storage(Storage):
    """An S3 prefix spoken to with boto3 (adaptive retries, bounded connection pool)."""

    #: Keys per ListObjectsV2 request (the S3 maximum).
    list_page_size = 1000

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_pool_connections: int = 32,
        max_attempts: int = 8,
    ) -> None:
        self.bucket, self.prefix = split_s3_uri(f"s3://{bucket}/{prefix}")
        # Resolved once, where the storage is created, so every actor talks to the same place.
        self.endpoint_url = _without_userinfo(
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.max_pool_connections = max_pool_connections
        self.max_attempts = max_attempts
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r}, endpoint={_display_endpoint(self.endpoint_url)!r})"

    def _make_client(self, max_attempts: int) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "adaptive", "max_attempts": max_attempts},
            max_pool_connections=self.max_pool_connections,
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
        )

    @property
    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client(self.max_attempts)
            return self._client

    def _key(self, key: str) -> str:
        return _join(self.prefix, validate_key(key))

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {_display_endpoint(self.endpoint_url)}"

    def _fail(self, exc: Exception, action: str, key: str | None = None) -> Exception:
        """Turn a boto3 error into FileNotFoundError / UserError with a safe message."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound") and key is not None:
                return FileNotFoundError(f"no object {key!r} under {self.uri}")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
                return UserError(f"{self._where()} does not exist (while trying to {action})")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return UserError(
                    f"access denied to {self._where()} ({code}) while trying to {action}; "
                    "check the credentials in the environment or AWS profile"
                )
            return UserError(f"S3 error {code} on {self._where()} while trying to {action}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return UserError(
                f"no usable AWS credentials for {self._where()}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or an AWS profile"
            )
        if isinstance(exc, EndpointConnectionError):
            return UserError(f"cannot reach S3 endpoint for {self._where()}")
        # Timeouts, dropped connections: transient, so an OSError the caller may retry.
        return OSError(f"S3 request to {self._where()} failed while trying to {action}: {exc}")

    def _call(self, action: str, fn: Any, key: str | None = None, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, action, key) from None

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        full = self._key(key)
        extra = {"ContentType": content_type} if content_type else {}
        if len(data) < MULTIPART_THRESHOLD:
            self._call(
                f"write {key!r}",
                self._s3.put_object,
                Bucket=self.bucket,
                Key=full,
                Body=data,
                **extra,
            )
            return
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_THRESHOLD // 2,
            max_concurrency=4,
        )
        self._call(
            f"write {key!r}",
            self._s3.upload_fileobj,
            Fileobj=io.BytesIO(data),
            Bucket=self.bucket,
            Key=full,
            ExtraArgs=extra or None,
            Config=config,
        )

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import IncompleteReadError, ResponseStreamingError

        # boto3 retries a request, but not a body cut off after the headers arrived.
        last: Exception | None = None
        for _ in range(max(1, self.max_attempts)):
            response = self._call(
                f"read {key!r}", self._s3.get_object, key, Bucket=self.bucket, Key=self._key(key)
            )
            try:
                return response["Body"].read()
            except (ResponseStreamingError, IncompleteReadError) as exc:
                last = exc
        raise self._fail(last, f"read {key!r}", key) from None

    def exists(self, key: str) -> bool:
        try:
            self._call(
                f"look up {key!r}",
                self._s3.head_object,
                key,
                Bucket=self.bucket,
                Key=self._key(key),
            )
        except FileNotFoundError:
            return False
        return True

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, prefix=True)
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=base + prefix,
            PaginationConfig={"PageSize": self.list_page_size},
        )
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"][len(base) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, f"list {prefix!r}") from None

    def create_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            # 412: it exists; 409: another conditional write of the same key is in flight.
            if exc.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                return False
            raise self._fail(exc, f"create {key!r}") from None
        return True

    def _delete(self, key: str) -> None:
        self._call(
            f"delete {key!r}", self._s3.delete_object, Bucket=self.bucket, Key=self._key(key)
        )

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list_keys(prefix))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            response = self._call(
                f"delete under {prefix!r}",
                self._s3.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise UserError(
                    f"could not delete {first.get('Key')!r} in {self._where()}: {first.get('Code')}"
                )
        return len(keys)

    def check_writable(self) -> None:
        # Few retries: a wrong endpoint or bucket should fail fast, before any actor starts.
        client = self._make_client(max_attempts=2)
        key = self._key(f"{_PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        action = f"write to {self.uri}"
        self._call(action, client.head_bucket, Bucket=self.bucket)
        self._call(action, client.put_object, Bucket=self.bucket, Key=key, Body=b"ok")
        self._call(action, client.delete_object, Bucket=self.bucket, Key=key)

    def arrow_fs(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        kwargs: dict[str, Any] = {}
        if self.region:
            kwargs["region"] = self.region
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            kwargs["endpoint_override"] = (
                f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
            )
            kwargs["scheme"] = parts.scheme or "https"
            kwargs["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**kwargs), _join(self.bucket, self.prefix)

    def key_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def child(self, prefix: str) -> S3Storage:
        return S3Storage(
            self.bucket,
            self._key(prefix),
            endpoint_url=self.endpoint_url,
            region=self.region,
            max_pool_connections=self.max_pool_connections,
            max_attempts=self.max_attempts,
        )


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


def read_uri(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    """Read one object by full URI (`s3://bucket/key`) or local path."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        if not key:
            raise UserError(f"{uri!r} names a bucket, not an object")
        return _bucket_storage(bucket, endpoint_url, region).get_bytes(key)
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"no file {uri!r}")
    return path.read_bytes()
