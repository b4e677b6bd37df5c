"""A Starlette request built in memory, for calling a serving replica without Serve."""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request


def make_request(path: str, *, method: str = "GET", body: bytes = b"",
                 headers: dict[str, str] | None = None,
                 query: dict[str, str] | list[tuple[str, str]] = ()) -> Request:
    """One HTTP request whose body is `body`, sent in one piece."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": method, "path": path, "headers": raw,
             "query_string": urlencode(query).encode()}
    return Request(scope, receive)
