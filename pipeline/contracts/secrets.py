"""Credentials never reach logs, manifests or outputs: the two rules that keep them out.

- `redact(text)` replaces the value of every credential environment variable (AWS keys,
  session tokens, the Ray auth token, the Muse API key) wherever it appears in a text.
- `public_url(url)` is a URL without its user:password part, query and fragment (where
  tokens hide), keeping IPv6 literals bracketed; it is what a URL looks like whenever it is
  shown, logged, pickled or written into a manifest.

A job may name another variable for its endpoint's key (`model.api_key_env`); the process
that reads it registers the name with `add_secret_env`, so its value is masked too.

A key goes only where it is needed: `read_key_file` reads a key file with a size bound and
never blocks (a FIFO or a device is refused); `check_key` refuses a key with a space, line
break or other non-printing character inside (no header can carry it, and an error that
quoted the header would show it), never repeating it; `hide_secret_env` takes a key out of the
environment that child processes inherit (its value stays masked); and a request that
carries a key ignores the proxy settings of the environment (`HTTP_PROXY`, ...) unless the
job opts in (`model.trust_env`), since a proxy would see the key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.contracts.errors import UserError

# Environment variables whose values are credentials; their values are masked in logs.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "RAY_AUTH_TOKEN",
    "WHAM_API_KEY",
    "MUSE_API_KEY",
)
REDACTED = "***"
#: Bytes of a key file read at most: a key is a line, not a document.
MAX_KEY_FILE_BYTES = 4096
# Values shorter than this are not masked: replacing a 1-3 character "secret" everywhere
# would mangle ordinary text and protects nothing.
_MIN_SECRET_LEN = 4


_extra_secret_vars: set[str] = set()
_hidden_values: set[str] = set()


def add_secret_env(name: str) -> None:
    """Mask the value of environment variable `name` in logs from now on (this process)."""
    _extra_secret_vars.add(name)


def hide_secret_env(name: str) -> None:
    """Take variable `name` out of this process's environment, so that the processes it
    starts from now on (a local Ray instance and its workers) do not inherit it; its value
    stays masked in this process's logs."""
    value = os.environ.pop(name, "").strip()
    if len(value) >= _MIN_SECRET_LEN:
        _hidden_values.add(value)


def read_key_file(path: str | os.PathLike[str], *, what: str) -> str:
    """The key in the file at `path` (surrounding whitespace stripped). UserError naming
    `what` when it is not a regular file (a FIFO would block, /dev/zero never ends), is
    larger than MAX_KEY_FILE_BYTES, is not text, or is empty."""
    shown = f"{what} {Path(path)}"
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"{shown}: cannot read it ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{shown}: not a regular file (a pipe, device or folder); put "
                            "the key in a plain file")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise UserError(f"{shown}: larger than {MAX_KEY_FILE_BYTES} bytes; it should hold "
                        "only the key")
    try:
        key = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not UTF-8 text; it should hold only the key") from None
    if not key:
        raise UserError(f"{shown}: the file is empty")
    return check_key(key, what=shown)


def check_key(key: str, *, what: str) -> str:
    """`key` if it is printable ASCII without spaces, as an Authorization header carries it;
    else a UserError naming `what` (and never the key)."""
    if not all(33 <= ord(ch) < 127 for ch in key):
        raise UserError(f"{what}: the key has spaces, line breaks or characters other than "
                        "printable ASCII inside it (two keys, or a key and a comment?); it "
                        "should hold only the key")
    return key


def bearer_headers(api_key_env: str | None, *, missing: str) -> dict[str, str]:
    """The JSON request headers of a Muse endpoint call: with `Authorization: Bearer` from
    the variable `api_key_env` (registered for masking first) unless it is None. A variable
    that is unset or empty is a UserError: `model.api_key_env: <name> is not set; <missing>`
    (`missing` says what to do where the caller runs)."""
    headers = {"Content-Type": "application/json"}
    if api_key_env is not None:
        add_secret_env(api_key_env)
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise UserError(f"model.api_key_env: {api_key_env} is not set; {missing}")
        check_key(key, what=f"model.api_key_env: {api_key_env}")
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _secret_values() -> list[str]:
    names = (*SECRET_ENV_VARS, *sorted(_extra_secret_vars))
    # Stripped, as keys are used: a value set with a line break is sent without it.
    values = {os.environ.get(name, "").strip() for name in names} | _hidden_values
    return sorted({v for v in values if len(v) >= _MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with the value of every credential environment variable replaced by ***."""
    for value in _secret_values():
        text = text.replace(value, REDACTED)
    return text


def public_url(url: str | None) -> str | None:
    """`url` without user:password, query and fragment; None stays None.

    Text that does not parse as a URL with a host comes back unchanged (a plain path).
    """
    if not url:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # e.g. a non-numeric port: show the scheme and host only
        parts, port = urlsplit(url.split("@")[-1] if "@" in url else url), None
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6 literal
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def public_data(value: Any) -> Any:
    """Plain data (dicts, lists, strings) with every URL in it made public."""
    if isinstance(value, dict):
        return {k: public_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_data(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return public_url(value)
    return value


def check_endpoint_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host, no user:password part and no query string
    or fragment; else ValueError (keys belong in the environment, never in a URL that gets
    logged). Neither the credentials nor the query are repeated in the message."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got "
                         f"{public_url(url)!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL carries credentials (user:password@); put the key in the "
                         "environment variable model.api_key_env names instead")
    if parts.query or parts.fragment:
        raise ValueError(f"{public_url(url)!r} must not have a query string or fragment (the "
                         "part after '?' or '#' was left out here, where tokens hide); put the "
                         "key in the environment variable model.api_key_env names instead")
    return url
