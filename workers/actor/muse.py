"""The Muse endpoint protocol: requests, responses and the official action form.

The hosted Muse / WHAM endpoints (and `wham-batch serve`) take a JSON POST

    {"input_data": {"context": [{"image": "<base64 PNG or JPEG>", "actions": [16 numbers],
                                 "tokens": [ints, optional]}, ...],
                    "parameters": {"temperature": 0.9, "top_k": null, "top_p": 1.0,
                                   "seed": 0}}}

and answer `{"results": [{"image": "<base64 PNG>", "actions": [16 floats], "tokens": [ints]}]}`:
the predicted next frame, the model's next action and the frame's image tokens. Both sides
of the protocol live here, so the server (`workers.actor.serve_replica`) and the endpoint client
(`workers.actor.endpoint`) cannot drift apart:

- actions in the official server's form: 12 buttons then 4 sticks in [-1, 1]; a button is
  pressed at >= 0.5, sticks are clipped to [-1, 1] and binned with the official bin edges,
  and go back out at the bin centres (`workers.wham.actions`);
- frames of any size are resized to the model's (Lanczos, as seeds are); only PNG and JPEG
  are decoded, with bounds on bytes and pixels before any pixel is decoded;
- a context longer than the model's window keeps its newest entries; an entry whose
  `tokens` has the model's token count is used as it is and its image is not decoded;
- keys this module does not know (in a context entry or in `parameters`) are ignored, as
  the official server does; everything it knows is checked, and a bad value raises
  `ProtocolError` naming the field (`input_data.context[2].actions`).

It sits on the actor side, beside its only users: frames are decoded by `workers.actor.inputs`
(the seed loader's bounds) and encoded by `workers.actor.encode` (the one watermark rule).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.actor.encode import encode_png
from workers.actor.inputs import decode_image, resize_frame
from workers.wham.actions import (
    ACTION_DIM,
    NUM_BUTTONS,
    STICK_BIN_CENTRES,
    sticks_to_bins,
)

#: Largest request body the server reads (a full 10-frame 300x180 context is ~1.5 MB).
MAX_BODY_BYTES = 16 * 2**20
#: More context entries than this is a malformed request, not a long history.
MAX_CONTEXT_ENTRIES = 64
#: Bounds on one context image: its decoded bytes and its pixels (checked before decoding).
MAX_IMAGE_BYTES = 8 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG")
BUTTON_THRESHOLD = 0.5
#: Sampling defaults of the official server.
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_P = 1.0
MAX_SEED = 2**63 - 1


class ProtocolError(ValueError):
    """A request (or a response) that does not follow the protocol.

    `field` is the JSON path of the bad value; `status` the HTTP status a server answers
    (400 bad input, 413 too large).
    """

    def __init__(self, field: str, message: str, *, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the codec needs to know about the model behind the endpoint."""

    image_size: tuple[int, int]  # (H, W)
    tokens_per_image: int
    image_vocab_size: int
    window: int  # context steps the model keeps (10 for the released models)


@dataclass(slots=True)
class ScoreRequest:
    """A parsed request: the context (newest `window` entries) and the sampling settings."""

    images: list[np.ndarray | None]  # uint8 (3,H,W) at the model's size; None where tokens
    tokens: list[np.ndarray | None]  # int64 (n,) where the entry's tokens are used
    actions: np.ndarray  # int64 (T,16) model form
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int | None = None
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    image_keys: list[str | None] = field(default_factory=list)  # image_key of decoded images

    @property
    def sampling_key(self) -> tuple[float, int | None, float]:
        return (self.temperature, self.top_k, self.top_p)


@dataclass(slots=True)
class ScoreResult:
    """One answer: the next frame, the model's next action and the frame's image tokens."""

    image: np.ndarray  # uint8 (3,H,W)
    action: np.ndarray  # int64 (16,) model form
    tokens: np.ndarray | None  # (n,) or None when the endpoint sent none


def _shown(value: Any) -> str:
    """A bad value as an error shows it: as JSON (the client sent JSON, not Python), cut
    short (a number may have 4000 digits)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else f"{text[:32]}... ({len(text)} characters)"


def _finite_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float: 10**400 is not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


# ---------------------------------------------------------------- actions


def official_to_model(values: Any, *, field: str) -> np.ndarray:
    """16 numbers in the official form -> one model-form action, int64 (16,)."""
    if not isinstance(values, list) or len(values) != ACTION_DIM:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise ProtocolError(field, f"expected a list of {ACTION_DIM} numbers "
                                   f"(12 buttons, 4 sticks), got {got}")
    for i, v in enumerate(values):
        if not isinstance(v, bool) and not _finite_number(v):
            raise ProtocolError(f"{field}[{i}]", f"expected a finite number, got {_shown(v)}")
    arr = np.asarray(values, dtype=np.float64)  # (16,)
    buttons = (arr[:NUM_BUTTONS] >= BUTTON_THRESHOLD).astype(np.int64)
    sticks = np.clip(arr[NUM_BUTTONS:], -1.0, 1.0)
    return np.concatenate([buttons, sticks_to_bins(sticks)])


def model_to_official(action: np.ndarray) -> list[float]:
    """One model-form action (16,) -> 12 buttons as 0.0/1.0 then 4 sticks at bin centres."""
    a = np.asarray(action, dtype=np.int64).reshape(ACTION_DIM)
    sticks = STICK_BIN_CENTRES[a[NUM_BUTTONS:]]
    # The centres are float32; round so -0.85 goes out as -0.85, not -0.8500000238418579.
    return [float(b) for b in a[:NUM_BUTTONS]] + [round(float(s), 6) for s in sticks]


# ---------------------------------------------------------------- frames


def encode_frame(image_chw: np.ndarray, *, text: dict[str, str] | None = None,
                 watermark: bool = False) -> str:
    """uint8 (3,H,W) -> base64 PNG text (provenance `text` chunks; the WHAM mark if asked)."""
    png = encode_png(image_chw, text=text or {}, watermark=watermark)
    return base64.b64encode(png).decode("ascii")


def decode_frame(data: Any, *, field: str, size: tuple[int, int] | None) -> np.ndarray:
    """Base64 PNG/JPEG text (optionally a `data:image/...;base64,` URL) -> uint8 (3,H,W),
    resized to `size` (None: as sent)."""
    if not isinstance(data, str) or not data:
        raise ProtocolError(field, "expected a base64-encoded PNG or JPEG image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ProtocolError(field, f"image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(field, "not valid base64") from None
    return frame_from_bytes(raw, field=field, size=size)


def frame_from_bytes(raw: bytes, *, field: str, size: tuple[int, int] | None) -> np.ndarray:
    """PNG or JPEG file bytes -> uint8 (3,H,W), resized to `size` (None: as sent)."""
    if len(raw) > MAX_IMAGE_BYTES:
        raise ProtocolError(field, f"image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        frame = decode_image(raw, formats=IMAGE_FORMATS, max_pixels=MAX_IMAGE_PIXELS)
    except Exception as exc:  # Pillow raises assorted types (struct.error, ...) on bad files
        raise ProtocolError(field, "not a readable PNG or JPEG image: "
                                   f"{str(exc) or type(exc).__name__}") from None
    if size is not None:
        frame = resize_frame(frame, size)
    return np.ascontiguousarray(frame.transpose(2, 0, 1))


# ---------------------------------------------------------------- requests (server side)


def read_json(body: bytes, *, field: str = "body") -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(field, f"not valid JSON ({exc})") from None


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(field, f"expected an object, got {type(value).__name__}")
    return value


def _entry_tokens(value: Any, *, field: str, shape: ModelShape) -> np.ndarray | None:
    """The entry's tokens when they are the model's (right count); None to encode its image."""
    if value is None or (isinstance(value, list) and len(value) != shape.tokens_per_image):
        return None
    if not isinstance(value, list):
        raise ProtocolError(field, f"expected a list of integers, got {type(value).__name__}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ProtocolError(field, "expected integers")
    # Checked as Python ints: a value beyond int64 would overflow the array.
    if not all(0 <= t < shape.image_vocab_size for t in value):
        raise ProtocolError(field, f"image tokens must lie in [0, {shape.image_vocab_size})")
    return np.asarray(value, dtype=np.int64)


def _parameters(value: Any) -> dict[str, Any]:
    """The sampling settings, checked; unknown keys are ignored."""
    field = "input_data.parameters"
    params = {} if value is None else _mapping(value, field)
    out: dict[str, Any] = {}
    t = params.get("temperature")
    if t is not None:
        if not _finite_number(t) or t < 0:
            raise ProtocolError(f"{field}.temperature", f"expected a number >= 0, got {_shown(t)}")
        out["temperature"] = float(t)
    k = params.get("top_k")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ProtocolError(f"{field}.top_k",
                                f"expected null or an integer >= 1, got {_shown(k)}")
        out["top_k"] = k
    p = params.get("top_p")
    if p is not None:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
            raise ProtocolError(f"{field}.top_p", f"expected a number in (0, 1], got {_shown(p)}")
        out["top_p"] = float(p)
    s = params.get("seed")
    if s is not None:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise ProtocolError(f"{field}.seed", f"expected an integer in 0..{MAX_SEED}, "
                                                 f"got {_shown(s)}")
        out["seed"] = s
    return out


def image_key(data: str) -> str:
    """A short digest of an entry's image text: the same text decodes to the same frame."""
    return hashlib.blake2b(data.encode("ascii", "replace"), digest_size=16).hexdigest()


def parse_request(body: bytes, *, shape: ModelShape,
                  known: Callable[[str], np.ndarray | None] | None = None,
                  max_body_bytes: int = MAX_BODY_BYTES) -> ScoreRequest:
    """A request body -> ScoreRequest; ProtocolError naming the field for anything bad.

    `known(image_key)` may return the tokens of an image seen before (iterative clients
    send their seed frames again with every step): such an image is not decoded again.
    `max_body_bytes` is the server's bound (`wham-batch serve --max-body-mb`).
    """
    if len(body) > max_body_bytes:
        raise ProtocolError("body", f"larger than {max_body_bytes} bytes", status=413)
    data = _mapping(read_json(body), "body")
    inputs = _mapping(data.get("input_data"), "input_data")
    context = inputs.get("context")
    if not isinstance(context, list) or not context:
        raise ProtocolError("input_data.context", "expected a non-empty list of steps")
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise ProtocolError("input_data.context", f"{len(context)} entries; at most "
                                                  f"{MAX_CONTEXT_ENTRIES} are accepted")
    params = _parameters(inputs.get("parameters"))
    first = len(context) - min(len(context), shape.window)  # keep the newest entries
    images: list[np.ndarray | None] = []
    tokens: list[np.ndarray | None] = []
    keys: list[str | None] = []
    actions = []
    for i in range(first, len(context)):
        where = f"input_data.context[{i}]"
        entry = _mapping(context[i], where)
        if "actions" not in entry:
            raise ProtocolError(f"{where}.actions", "missing (16 numbers: 12 buttons, 4 sticks)")
        actions.append(official_to_model(entry["actions"], field=f"{where}.actions"))
        given = _entry_tokens(entry.get("tokens"), field=f"{where}.tokens", shape=shape)
        image, key = entry.get("image"), None
        if given is None and known is not None and isinstance(image, str):
            key = image_key(image)
            given = known(key)
        tokens.append(given)
        keys.append(key if given is None else None)
        images.append(None if given is not None else
                      decode_frame(image, field=f"{where}.image", size=shape.image_size))
    return ScoreRequest(images=images, tokens=tokens, actions=np.stack(actions),
                        image_keys=keys, **params)


def build_response(result: ScoreResult, *, text: dict[str, str] | None = None,
                   watermark: bool = False) -> dict[str, Any]:
    tokens = [] if result.tokens is None else [int(t) for t in result.tokens]
    return {"results": [{"image": encode_frame(result.image, text=text, watermark=watermark),
                         "actions": model_to_official(result.action), "tokens": tokens}]}


# ---------------------------------------------------------------- client side


def context_entry(*, image: np.ndarray | None, action: np.ndarray,
                  tokens: np.ndarray | None) -> dict[str, Any]:
    """One context step as a client sends it: the frame as base64 PNG, the action in the
    official form and the frame's tokens (empty when not known). Built once per step and
    reused while the step stays in the context."""
    entry: dict[str, Any] = {"actions": model_to_official(action)}
    if image is not None:
        entry["image"] = encode_frame(image)
    entry["tokens"] = [] if tokens is None else [int(t) for t in tokens]
    return entry


def request_body(context: list[dict[str, Any]], *, parameters: dict[str, Any]) -> bytes:
    return json.dumps({"input_data": {"context": context, "parameters": parameters}}).encode()


def parse_response(body: bytes, *, size: tuple[int, int] | None,
                   tokens_per_image: int | None) -> ScoreResult:
    """A response body -> ScoreResult, the frame resized to `size` (None: as sent).

    Tokens are kept when there are `tokens_per_image` of them (any count when None) and
    they fit the steps table's uint16 column; otherwise `tokens` is None.
    """
    data = _mapping(read_json(body), "response")
    results = data.get("results")
    if not isinstance(results, list) or not results:
        raise ProtocolError("response.results", "expected a non-empty list")
    first = _mapping(results[0], "response.results[0]")
    frame = decode_frame(first.get("image"), field="response.results[0].image", size=size)
    action = official_to_model(first.get("actions"), field="response.results[0].actions")
    raw = first.get("tokens")
    usable = (isinstance(raw, list) and raw
              and (tokens_per_image is None or len(raw) == tokens_per_image)
              and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**16
                      for t in raw))
    tokens = np.asarray(raw, dtype=np.int64) if usable else None
    return ScoreResult(image=frame, action=action, tokens=tokens)

