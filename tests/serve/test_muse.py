"""The Muse protocol codec on its own: actions, frames, requests and responses."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from workers.actor.muse import (
    MAX_BODY_BYTES,
    MAX_CONTEXT_ENTRIES,
    ModelShape,
    ProtocolError,
    ScoreResult,
    build_response,
    context_entry,
    decode_frame,
    image_key,
    model_to_official,
    official_to_model,
    parse_request,
    parse_response,
    request_body,
)
from workers.wham.actions import STICK_BIN_CENTRES, STICK_BIN_EDGES

SHAPE = ModelShape(image_size=(16, 24), tokens_per_image=6, image_vocab_size=50, window=10)


def _png(h: int, w: int, *, fmt: str = "PNG", value: int = 90) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (value, 2 * value % 256, 30)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _body(context: list[dict], **params) -> bytes:
    return json.dumps({"input_data": {"context": context, "parameters": params}}).encode()


def _entry(**extra) -> dict:
    return {"image": _png(16, 24), "actions": [0] * 16, **extra}


# ---------------------------------------------------------------- actions


def test_sticks_are_binned_with_the_official_edges_and_returned_at_centres() -> None:
    for k in range(11):  # any value inside bin k maps to k, and k goes out at its centre
        low, high = max(STICK_BIN_EDGES[k], -1.0), min(STICK_BIN_EDGES[k + 1], 1.0)
        for v in (low, (low + high) / 2, np.nextafter(high, low)):
            action = official_to_model([0] * 12 + [float(v)] * 4, field="a")
            assert list(action[12:]) == [k] * 4, v
        back = model_to_official(np.array([0] * 12 + [k] * 4))
        assert back[12:] == [round(float(STICK_BIN_CENTRES[k]), 6)] * 4
    assert model_to_official(np.array([0] * 12 + [1, 9, 5, 6]))[12:] == [-0.85, 0.85, 0.0, 0.15]


def test_buttons_press_at_one_half_and_sticks_clip() -> None:
    action = official_to_model([0.49, 0.5, 1, 0, True, False, 0.7, 0.2, 0, 0, 0, 3.0,
                                -7.5, 7.5, -1.0, 1.0], field="a")
    assert list(action) == [0, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 10, 0, 10]


@pytest.mark.parametrize(("values", "field"), [
    ([0] * 15, "a"), ("sixteen", "a"), ([0] * 15 + ["x"], "a[15]"),
    ([float("nan")] + [0] * 15, "a[0]"), ([0] * 14 + [float("inf"), 0], "a[14]"),
    ([10**400] + [0] * 15, "a[0]"), ([0] * 15 + [-(2**1100)], "a[15]"),  # beyond a float
])
def test_bad_actions_name_their_field(values, field) -> None:
    with pytest.raises(ProtocolError) as info:
        official_to_model(values, field="a")
    assert info.value.field == field and info.value.status == 400


# ---------------------------------------------------------------- frames


def test_frames_of_any_size_and_jpeg_are_resized_to_the_model() -> None:
    for data in (_png(180, 300), _png(16, 24), _png(7, 5, fmt="JPEG"),
                 "data:image/png;base64," + _png(40, 40)):
        frame = decode_frame(data, field="f", size=(16, 24))
        assert frame.shape == (3, 16, 24) and frame.dtype == np.uint8
    same = decode_frame(_png(16, 24), field="f", size=None)
    assert same.shape == (3, 16, 24) and same[0, 0, 0] == 90


@pytest.mark.parametrize("data", [None, "", "%%%", base64.b64encode(b"not an image").decode(),
                                  base64.b64encode(b"%!PS-Adobe-3.0 EPSF").decode()])
def test_bad_frames_are_refused(data) -> None:
    with pytest.raises(ProtocolError, match="^f:"):
        decode_frame(data, field="f", size=(16, 24))


def test_a_frame_over_the_pixel_bound_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("1", (4200, 4100)).save(buf, format="PNG")
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_frame(base64.b64encode(buf.getvalue()).decode(), field="f", size=(16, 24))


# ---------------------------------------------------------------- requests


def test_a_request_keeps_the_newest_window_and_ignores_unknown_keys() -> None:
    context = [_entry(actions=[0] * 12 + [(i % 11) / 5 - 1] * 4, actions_output=[1] * 16,
                      step=i) for i in range(14)]
    req = parse_request(_body(context, temperature=0.5, top_k=3, top_p=0.8, seed=9, x=1),
                        shape=SHAPE)
    assert len(req.images) == len(req.actions) == 10
    expected = [official_to_model(context[i]["actions"], field="a") for i in range(4, 14)]
    assert np.array_equal(req.actions, np.stack(expected))
    assert (req.temperature, req.top_k, req.top_p, req.seed) == (0.5, 3, 0.8, 9)
    default = parse_request(_body([_entry()]), shape=SHAPE)
    assert (default.temperature, default.top_k, default.top_p, default.seed) == (
        0.9, None, 1.0, None)


def test_tokens_of_the_models_count_replace_the_image() -> None:
    good = _entry(tokens=[1, 2, 3, 4, 5, 49], image="never decoded")
    other_count = _entry(tokens=[7] * 540)  # another model's tokens: the image is used
    req = parse_request(_body([good, other_count, _entry(tokens=[])]), shape=SHAPE)
    assert list(req.tokens[0]) == [1, 2, 3, 4, 5, 49] and req.images[0] is None
    assert req.tokens[1] is None and req.images[1].shape == (3, 16, 24)
    assert req.tokens[2] is None and req.images[2] is not None


@pytest.mark.parametrize(("body", "field", "status"), [
    (b"{", "body", 400),
    (b"[]", "body", 400),
    (json.dumps({"input_data": []}).encode(), "input_data", 400),
    (_body([]), "input_data.context", 400),
    (_body([_entry()] * (MAX_CONTEXT_ENTRIES + 1)), "input_data.context", 400),
    (_body([_entry(), 3]), "input_data.context[1]", 400),
    (_body([{"image": _png(16, 24)}]), "input_data.context[0].actions", 400),
    (_body([_entry(tokens=[1] * 5 + [50])]), "input_data.context[0].tokens", 400),
    (_body([_entry(tokens=[1] * 5 + [1.5])]), "input_data.context[0].tokens", 400),
    (_body([_entry(tokens="abc")]), "input_data.context[0].tokens", 400),
    (_body([_entry(tokens=[1] * 5 + [2**70])]), "input_data.context[0].tokens", 400),
    (_body([_entry(tokens=[-(2**64)] + [1] * 5)]), "input_data.context[0].tokens", 400),
    (_body([_entry(), _entry(actions=[0, 10**400] + [0] * 14)]),
     "input_data.context[1].actions[1]", 400),
    (_body([_entry()], temperature=10**400), "input_data.parameters.temperature", 400),
    (_body([_entry()], temperature=-1), "input_data.parameters.temperature", 400),
    (_body([_entry()], top_k=0), "input_data.parameters.top_k", 400),
    (_body([_entry()], top_p=1.5), "input_data.parameters.top_p", 400),
    (_body([_entry()], seed=2**63), "input_data.parameters.seed", 400),
    (_body([_entry()], seed=True), "input_data.parameters.seed", 400),
    (b" " * (MAX_BODY_BYTES + 1), "body", 413),
    (_body([_entry()], seed=10**4000), "input_data.parameters.seed", 400),
])
def test_bad_requests_name_their_field(body: bytes, field: str, status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(body, shape=SHAPE)
    assert (info.value.field, info.value.status) == (field, status)
    assert info.value.body() == {"error": str(info.value), "field": field}
    assert len(str(info.value)) < 300  # a 4000-digit number is not repeated whole


def test_the_body_bound_is_the_servers_setting() -> None:
    """`wham-batch serve --max-body-mb` above or below the default is the bound."""
    padded = json.loads(_body([_entry()]))
    padded["padding"] = "x" * (MAX_BODY_BYTES + 1)  # an unknown key: ignored
    body = json.dumps(padded).encode()
    with pytest.raises(ProtocolError) as info:
        parse_request(body, shape=SHAPE)
    assert info.value.status == 413
    req = parse_request(body, shape=SHAPE, max_body_bytes=2 * MAX_BODY_BYTES)
    assert req.actions.shape == (1, 16)
    small = _body([_entry()])
    with pytest.raises(ProtocolError, match=f"larger than {len(small) - 1} bytes") as info:
        parse_request(small, shape=SHAPE, max_body_bytes=len(small) - 1)
    assert info.value.status == 413


# ---------------------------------------------------------------- both directions


def test_a_response_and_a_request_round_trip() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 16, 24), dtype=np.uint8)
    action = np.array([1, 0] * 6 + [0, 10, 5, 7])
    result = ScoreResult(image=image, action=action, tokens=np.arange(6))
    reply = json.dumps(build_response(result, text={"model_id": "m"})).encode()
    back = parse_response(reply, size=(16, 24), tokens_per_image=6)
    assert np.array_equal(back.image, image) and np.array_equal(back.action, action)
    assert list(back.tokens) == list(range(6))
    assert parse_response(reply, size=(16, 24), tokens_per_image=540).tokens is None
    entry = context_entry(image=image, action=action, tokens=back.tokens)
    req = parse_request(request_body([entry], parameters={"seed": 4}), shape=SHAPE)
    assert req.images[0] is None and list(req.tokens[0]) == list(range(6))
    assert np.array_equal(req.actions[0], action) and req.seed == 4


@pytest.mark.parametrize("body", [b"<html>", b"{}", b'{"results": []}',
                                  b'{"results": [{"image": "x", "actions": [0]}]}',
                                  json.dumps({"results": [{"image": _png(16, 24),
                                                           "actions": [10**400] * 16}]}).encode()])
def test_unusable_responses_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_response(body, size=(16, 24), tokens_per_image=6)


def test_known_images_are_not_decoded_again() -> None:
    entry = _entry()
    key = image_key(entry["image"])
    cached = np.arange(6)
    req = parse_request(_body([entry, _entry(image=_png(16, 24, value=7))]), shape=SHAPE,
                        known={key: cached}.get)
    assert req.images[0] is None and req.tokens[0] is cached and req.image_keys[0] is None
    assert req.images[1] is not None and req.image_keys[1] == image_key(_png(16, 24, value=7))
