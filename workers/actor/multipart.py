"""A strict, bounded reader of `multipart/form-data` request bodies (RFC 7578).

The official local-server protocol uploads a job as a form: a `json` field and one file per
image. The body reaches this module already read and bounded by the server's body limit;
the reader then bounds what a body can hold: at most `max_parts` parts (it stops at the
first one beyond), at most `max_part_bytes` in one part, at most `MAX_HEADER_BYTES` of
headers per part. Field names and file names come from `Content-Disposition`, quoted or
not (.NET's HttpClient writes `name=json` unquoted, browsers quote), with `filename*`
(RFC 5987) understood. Anything malformed raises `ProtocolError` naming `body` or
`Content-Type`; a limit exceeded answers 413. `encode_form` is the client's side.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from urllib.parse import unquote

from workers.actor.muse import ProtocolError

MAX_HEADER_BYTES = 16 * 1024
MAX_BOUNDARY_CHARS = 70  # RFC 2046
#: `; key=value` or `; key="quoted \"value\""` in a header.
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a form: its field name, its file name (None for a plain field), its
    declared content type and its bytes."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="a"; filename=b.png` -> ("form-data", {"name": "a", ...}); keys are
    lower case, quoted values unquoted."""
    kind, _, rest = value.partition(";")
    params = {}
    for key, raw in _PARAM.findall(";" + rest):
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(key.lower(), raw)
    return kind.strip().lower(), params


def boundary_of(content_type: str | None) -> bytes:
    kind, params = header_params(content_type or "")
    if kind != "multipart/form-data":
        raise ProtocolError("Content-Type", f"expected multipart/form-data, got "
                                            f"{(content_type or 'none')[:80]!r}")
    boundary = params.get("boundary", "")
    if not 0 < len(boundary) <= MAX_BOUNDARY_CHARS or not boundary.isascii():
        raise ProtocolError("Content-Type", "multipart/form-data without a valid boundary")
    return boundary.encode("ascii")


def _headers(block: bytes) -> dict[str, str]:
    text = block.decode("utf-8", "replace")
    headers = {}
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError("body", f"a form part has a malformed header {line[:80]!r}")
        headers.setdefault(name.strip().lower(), value.strip())
    return headers


def _part(raw: bytes, *, index: int, max_part_bytes: int) -> Part:
    head_end = raw.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
    if head_end == -1:
        raise ProtocolError("body", f"form part {index} has no end of headers within "
                                    f"{MAX_HEADER_BYTES} bytes")
    headers = _headers(raw[:head_end])
    kind, params = header_params(headers.get("content-disposition", ""))
    if kind != "form-data" or not params.get("name"):
        raise ProtocolError("body", f"form part {index} has no Content-Disposition: "
                                    "form-data with a name")
    filename = params.get("filename")
    starred = params.get("filename*", "")
    if starred.lower().startswith("utf-8''"):
        filename = unquote(starred[7:], errors="replace")
    data = raw[head_end + 4:]
    if len(data) > max_part_bytes:
        raise ProtocolError(params["name"], f"{len(data)} bytes; at most {max_part_bytes} "
                                            "are accepted in one form part", status=413)
    return Part(name=params["name"], filename=filename,
                content_type=headers.get("content-type"), data=data)


def parse_form(body: bytes, content_type: str | None, *, max_parts: int,
               max_part_bytes: int) -> list[Part]:
    """The parts of a `multipart/form-data` body, in order."""
    boundary = boundary_of(content_type)
    delimiter = b"\r\n--" + boundary
    text = b"\r\n" + body  # the first delimiter may open the body without a line break
    pos = text.find(delimiter)
    if pos == -1:
        raise ProtocolError("body", "no form part (the boundary of Content-Type is not in "
                                    "the body)")
    parts: list[Part] = []
    while True:
        pos += len(delimiter)
        if text.startswith(b"--", pos):
            return parts
        line_end = text.find(b"\r\n", pos)
        if line_end == -1 or text[pos:line_end].strip(b" \t"):
            raise ProtocolError("body", "a form boundary is not followed by a line break")
        nxt = text.find(delimiter, line_end)
        if nxt == -1:
            raise ProtocolError("body", "the form ends without its closing boundary")
        if len(parts) == max_parts:
            raise ProtocolError("body", f"more than {max_parts} form parts", status=413)
        parts.append(_part(text[line_end + 2:nxt], index=len(parts),
                           max_part_bytes=max_part_bytes))
        pos = nxt


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def encode_form(parts: list[Part]) -> tuple[bytes, str]:
    """(body, Content-Type) of a `multipart/form-data` request holding `parts`."""
    boundary = secrets.token_hex(16)
    chunks = []
    for part in parts:
        disposition = f'form-data; name="{_quoted(part.name)}"'
        if part.filename is not None:
            disposition += f'; filename="{_quoted(part.filename)}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if part.content_type:
            head += f"Content-Type: {part.content_type}\r\n"
        chunks += [head.encode() + b"\r\n", part.data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
