"""Bad input to `wham-batch serve` is answered in the client's terms: a 400 body names the
field and shows the value as JSON, never a Python repr."""

from __future__ import annotations

import base64

import pytest

from workers.actor.muse import ProtocolError, decode_frame, official_to_model


def test_an_image_that_is_none_is_named_without_a_python_repr() -> None:
    data = base64.b64encode(b"no picture here").decode()
    with pytest.raises(ProtocolError) as caught:
        decode_frame(data, field="input_data.context[0].image", size=None)
    body = caught.value.body()
    assert body["field"] == "input_data.context[0].image"
    assert body["error"].endswith("not a readable PNG or JPEG image: the data is none of PNG, "
                                  "JPEG")
    assert "object at 0x" not in body["error"] and "<_io" not in body["error"]
    assert "Error:" not in body["error"]  # no exception class names either


@pytest.mark.parametrize(("value", "shown"), [(None, "null"), ({"a": 1}, '{"a": 1}'),
                                              ("up", '"up"'), ([1], "[1]")])
def test_bad_values_are_shown_as_the_client_sent_them(value: object, shown: str) -> None:
    actions = [0.0] * 16
    actions[3] = value
    with pytest.raises(ProtocolError) as caught:
        official_to_model(actions, field="actions")
    assert caught.value.body() == {"error": f"actions[3]: expected a finite number, got {shown}",
                                   "field": "actions[3]"}
