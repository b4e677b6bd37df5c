"""An S3 prefix as storage, spoken to with boto3 (adaptive retries, bounded pool).

The client is created lazily in each process, so the object pickles small (Ray ships it to
actors). Credentials come from the environment or AWS profiles through boto3 and pyarrow's
own lookup; they are never stored here, shown in `uri`/`repr` or put into error messages.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ResponseStreamingError,
)

from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import public_url
from pipeline.contracts.storage.base import (
    PROBE_PREFIX,
    ObjectHead,
    Storage,
    StorageFatalError,
    TransientStorageError,
    backoff_delay,
    join_keys,
    too_large,
    validate_key,
)

#: Objects at least this large go through boto3's multipart transfer.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
#: Tries of a conditional create that S3 answers 409 ConditionalRequestConflict.
CONFLICT_ATTEMPTS = 3
#: Error codes S3 answers when it is busy or briefly failing (still so after boto3's own
#: retries); and 409 ConditionalRequestConflict: another conditional write of the same key
#: was in flight. A later attempt may succeed: a TransientStorageError the caller retries.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "500", "502", "503", "504",
    "ConditionalRequestConflict",
})


class _ConditionFailed(Exception):
    """412 PreconditionFailed: the object is not as a conditional request expected."""


class _WriteConflict(TransientStorageError):
    """409 ConditionalRequestConflict: another conditional write of the key was in flight."""


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


def check_s3_endpoint(url: str | None, *, what: str = "S3 endpoint URL") -> str | None:
    """`url` if it is an http(s) endpoint without a query string or fragment, else a
    UserError that shows the URL without its secrets (a token hides in the query)."""
    if url is None:
        return None
    shown = public_url(url)
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        raise UserError(f"{what} {shown!r} is not a valid URL (bad host or port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise UserError(f"{what} {shown!r} must look like http(s)://HOST[:PORT]")
    if parts.query or parts.fragment:
        raise UserError(
            f"{what} {shown!r} must not have a query string or fragment (the part after '?' "
            "or '#' was left out here); give credentials through the environment or an AWS "
            "profile, never in the URL")
    return url


def _display_endpoint(endpoint_url: str | None) -> str:
    return public_url(endpoint_url) or "AWS default endpoint"


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
        self.endpoint_url = public_url(check_s3_endpoint(
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        ))
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
        return join_keys(self.prefix, validate_key(key))

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {_display_endpoint(self.endpoint_url)}"

    def _fail(self, exc: Exception, action: str, key: str | None = None) -> Exception:
        """Turn a boto3 error into FileNotFoundError / UserError / TransientStorageError
        with a safe message."""
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound") and key is not None:
                return FileNotFoundError(f"no object {key!r} under {self.uri}")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
                return StorageFatalError(
                    f"{self._where()} does not exist (while trying to {action})")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageFatalError(
                    f"access denied to {self._where()} ({code}) while trying to {action}; "
                    "check the credentials in the environment or AWS profile"
                )
            if code == "PreconditionFailed":
                return _ConditionFailed(action)
            if code in _TRANSIENT_CODES:
                kind = (_WriteConflict if code == "ConditionalRequestConflict"
                        else TransientStorageError)
                return kind(f"S3 answered {code} on {self._where()} while trying to {action}")
            return UserError(f"S3 error {code} on {self._where()} while trying to {action}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return UserError(
                f"no usable AWS credentials for {self._where()}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or an AWS profile"
            )
        if isinstance(exc, EndpointConnectionError):
            return UserError(f"cannot reach S3 endpoint for {self._where()}")
        # Timeouts, dropped connections: a later attempt may succeed.
        return TransientStorageError(
            f"S3 request to {self._where()} failed while trying to {action}: {exc}")

    def _call(self, action: str, fn: Any, key: str | None = None, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, action, key) from None

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        self._write(key, data, {"ContentType": content_type} if content_type else {})

    def put_with_checksum(self, key: str, data: bytes, *,
                          content_type: str | None = None) -> str | None:
        extra = {"ChecksumAlgorithm": "SHA256",
                 **({"ContentType": content_type} if content_type else {})}
        answer = self._write(key, data, extra)
        if answer is None:  # a multipart upload: S3 made its composite checksum; ask for it
            return self.head(key).sha256
        return answer.get("ChecksumSHA256")

    def _write(self, key: str, data: bytes, extra: dict[str, str]) -> dict[str, Any] | None:
        """PutObject's answer, or None after a multipart upload (large objects)."""
        full, action = self._key(key), f"write {key!r}"
        if len(data) < MULTIPART_THRESHOLD:
            return self._call(action, self._s3.put_object, Bucket=self.bucket, Key=full,
                              Body=data, **extra)
        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                multipart_chunksize=MULTIPART_THRESHOLD // 2, max_concurrency=4)
        self._call(action, self._s3.upload_fileobj, Fileobj=io.BytesIO(data),
                   Bucket=self.bucket, Key=full, ExtraArgs=extra or None, Config=config)
        return None

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return self.get_tagged(key, max_bytes=max_bytes)[0]

    def get_tagged(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        # boto3 retries a request, but not a body cut off after the headers arrived.
        last: Exception | None = None
        for attempt in range(max(1, self.max_attempts)):
            if attempt:
                time.sleep(backoff_delay(attempt - 1))
            response = self._call(
                f"read {key!r}", self._s3.get_object, key, Bucket=self.bucket, Key=self._key(key)
            )
            size = int(response.get("ContentLength") or 0)
            if max_bytes is not None and size > max_bytes:
                response["Body"].close()
                raise too_large(self.key_uri(key), size, max_bytes)
            try:
                return response["Body"].read(), str(response.get("ETag", ""))
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

    def head(self, key: str) -> ObjectHead:
        answer = self._call(f"look up {key!r}", self._s3.head_object, key, Bucket=self.bucket,
                            Key=self._key(key), ChecksumMode="ENABLED")
        return ObjectHead(size=int(answer.get("ContentLength") or 0),
                          sha256=answer.get("ChecksumSHA256"))

    def list_keys(self, prefix: str = "", *, start_after: str = "") -> Iterator[str]:
        validate_key(prefix, prefix=True)
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=base + prefix,
            **({"StartAfter": base + start_after} if start_after else {}),
            PaginationConfig={"PageSize": self.list_page_size},
        )
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"][len(base) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, f"list {prefix!r}") from None

    def _conditional(self, action: str, fn: Any, key: str | None = None,
                     **kwargs: Any) -> Any | None:
        """The answer to a conditional request, or None when its condition does not hold."""
        attempt = 0
        while True:
            try:
                return self._call(action, fn, key, **kwargs)
            except _ConditionFailed:
                return None
            except _WriteConflict:
                # 409 says nothing about whether the condition holds: ask again; still so,
                # a TransientStorageError the caller retries.
                attempt += 1
                if attempt >= CONFLICT_ATTEMPTS:
                    raise
            time.sleep(backoff_delay(attempt - 1))

    def create_if_absent(self, key: str, data: bytes) -> bool:
        return self.put_if(key, data, match=None) is not None

    def put_if(self, key: str, data: bytes, *, match: str | None) -> str | None:
        if match is None:
            action, condition, missing = f"create {key!r}", {"IfNoneMatch": "*"}, None
        else:
            action, condition, missing = f"replace {key!r}", {"IfMatch": match}, key
        try:
            answer = self._conditional(action, self._s3.put_object, missing, Bucket=self.bucket,
                                       Key=self._key(key), Body=data, **condition)
        except FileNotFoundError:
            return None  # If-Match where there is no object: 404 NoSuchKey
        return None if answer is None else str(answer.get("ETag", ""))

    def delete_if(self, key: str, *, match: str) -> bool:
        try:
            answer = self._conditional(f"delete {key!r}", self._s3.delete_object, key=key,
                                       Bucket=self.bucket, Key=self._key(key), IfMatch=match)
        except FileNotFoundError:
            return False
        return answer is not None

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
        key = self._key(f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        action = f"write to {self.uri}"
        self._call(action, client.head_bucket, Bucket=self.bucket)
        self._call(action, client.put_object, Bucket=self.bucket, Key=key, Body=b"ok")
        self._call(action, client.delete_object, Bucket=self.bucket, Key=key)

    def arrow_fs(self) -> tuple[Any, str]:
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
        return pafs.S3FileSystem(**kwargs), join_keys(self.bucket, self.prefix)

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
