"""A client of the official local-server protocol that talks as the WHAM Demonstrator does.

The Demonstrator (a .NET program) uploads a job with `HttpClient` and
`MultipartFormDataContent`: the boundary quoted in the request's Content-Type, the `json`
field as `text/plain; charset=utf-8` named without quotes (`name=json`), each image as a
file part whose field name and file name are the step's `image_name` (with an RFC 5987
`filename*` beside `filename`). Its sampling settings are text ("0.9", "None") and its
tokens floats. It polls `get_job_results` with repeated `job_ids=` parameters and reads the
zip; it cancels with `cancel_job?job_id=`. Written here from those observations, apart
from the server's own codec, so that a bug on one side cannot hide in the other.
"""

from __future__ import annotations

import http.client
import io
import json
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

TIMEOUT_S = 120.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    #: for a results zip: predictions.json, and every file in it by name
    predictions: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def dotnet_form(fields: list[tuple[str, str | None, str, bytes]]) -> tuple[bytes, str]:
    """(body, Content-Type) as MultipartFormDataContent writes them; fields are
    (name, file name or None, content type, bytes)."""
    boundary = str(uuid.uuid4())
    chunks = []
    for name, filename, content_type, data in fields:
        disposition = f"form-data; name={name}"
        if filename is not None:
            disposition += f"; filename={filename}; filename*=utf-8''{filename}"
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                      f"Content-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/form-data; boundary="{boundary}"'


def job_json(steps: list[dict[str, Any]], *, predict: int, parallel: int = 1,
             temperature: str = "0.9", top_k: str = "None", top_p: str = "1",
             **extra: Any) -> dict[str, Any]:
    """The `json` field of a new job, with the settings as text as the Demonstrator sends."""
    return {"steps": steps, "num_steps_to_predict": predict, "num_parallel_predictions": parallel,
            "temperature": temperature, "top_k": top_k, "top_p": top_p, **extra}


class DemonstratorClient:
    def __init__(self, url: str, *, key: str | None) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.key = key

    def _request(self, method: str, path: str, *, body: bytes | None = None,
                 content_type: str | None = None) -> Answer:
        headers = {} if content_type is None else {"Content-Type": content_type}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            answer = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()
        if answer.status == 200 and answer.headers.get("content-type") == "application/zip":
            with zipfile.ZipFile(io.BytesIO(answer.body)) as archive:
                answer.files = {n: archive.read(n) for n in archive.namelist()}
            answer.predictions = json.loads(answer.files["predictions.json"])
        return answer

    def details(self) -> Answer:
        return self._request("GET", "/")

    def new_job(self, job: dict[str, Any] | bytes, images: dict[str, bytes]) -> Answer:
        data = job if isinstance(job, bytes) else json.dumps(job).encode()
        fields = [("json", None, "text/plain; charset=utf-8", data)]
        fields += [(name, name, "image/png", png) for name, png in images.items()]
        body, content_type = dotnet_form(fields)
        return self.post_form(body, content_type)

    def post_form(self, body: bytes, content_type: str) -> Answer:
        return self._request("POST", "/new_job", body=body, content_type=content_type)

    def results(self, job_ids: list[str]) -> Answer:
        query = urlencode([("job_ids", j) for j in job_ids])
        return self._request("GET", f"/get_job_results?{query}")

    def cancel(self, job_id: str) -> Answer:
        return self._request("GET", f"/cancel_job?{urlencode({'job_id': job_id})}")
