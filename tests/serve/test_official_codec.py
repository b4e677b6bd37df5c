"""The official local-server protocol without a server: the multipart reader, `POST /new_job`
parsing (defaults, the Demonstrator's text settings, errors naming the field), a job's steps
(N + 1 of them, the context sliding, future actions) and the results zip."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from support.official import dotnet_form, job_json

from workers.actor.multipart import Part, encode_form, parse_form
from workers.actor.muse import ModelShape, ProtocolError, ScoreResult
from workers.actor.official import (
    MAX_FORM_PARTS,
    MAX_STEPS,
    JobLimits,
    StepResult,
    advance,
    job_seed,
    next_step,
    parse_new_job,
    results_zip,
    step_result,
)

SHAPE = ModelShape(image_size=(18, 30), tokens_per_image=6, image_vocab_size=50, window=10)
LIMITS = JobLimits(max_concurrent_jobs=4, max_dream_steps_per_job=5, max_job_lifespan_s=60)


def png(seed: int, size: tuple[int, int] = (300, 180)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def steps(n: int, **step: object) -> list[dict]:
    return [{"image_name": f"image{i}.png", "action": [0.0] * 12 + [0.15, -1.0, 0.0, 0.97],
             "tokens": None, **step} for i in range(n)]


def parse(job: dict | bytes, images: dict[str, bytes] | None = None, *,
          limits: JobLimits = LIMITS):  # noqa: ANN201
    data = job if isinstance(job, bytes) else json.dumps(job).encode()
    images = {f"image{i}.png": png(i) for i in range(3)} if images is None else images
    fields = [("json", None, "text/plain; charset=utf-8", data)]
    body, content_type = dotnet_form(fields + [(n, n, "image/png", b) for n, b in images.items()])
    parts = parse_form(body, content_type, max_parts=MAX_FORM_PARTS, max_part_bytes=2**20)
    return parse_new_job(parts, shape=SHAPE, limits=limits)


# ---------------------------------------------------------------- multipart


def test_dotnet_and_browser_forms_read_alike() -> None:
    body, content_type = dotnet_form([("json", None, "text/plain", b'{"a": 1}'),
                                      ("image0.png", "image0.png", "image/png", b"\x89PNG..")])
    dotnet = parse_form(body, content_type, max_parts=4, max_part_bytes=100)
    browser = (b'--b\r\nContent-Disposition: form-data; name="json"\r\n\r\n{"a": 1}\r\n'
               b'--b\r\nContent-Disposition: form-data; name="image0.png"; '
               b'filename="image0.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG..\r\n--b--\r\n')
    chrome = parse_form(browser, "multipart/form-data; boundary=b", max_parts=4,
                        max_part_bytes=100)
    assert [(p.name, p.filename, p.data) for p in dotnet] == \
        [(p.name, p.filename, p.data) for p in chrome] == \
        [("json", None, b'{"a": 1}'), ("image0.png", "image0.png", b"\x89PNG..")]


def test_the_client_side_form_reads_back_whatever_the_names() -> None:
    parts = [Part("json", None, "application/json", b"{}"),
             Part('we"ird\\ na;me=.png', 'we"ird\\ na;me=.png', "image/png", b"\r\n--x\r\n")]
    body, content_type = encode_form(parts)
    assert parse_form(body, content_type, max_parts=2, max_part_bytes=100) == parts


@pytest.mark.parametrize(("body", "content_type", "field", "status"), [
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--", "text/plain",
     "Content-Type", 400),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--",
     "multipart/form-data", "Content-Type", 400),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx", "multipart/form-data; boundary=b",
     "body", 400),
    (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b",
     "body", 400),
    (b"no boundary here", "multipart/form-data; boundary=b", "body", 400),
    (b"--b\r\nX: " + b"y" * 20_000 + b"\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b",
     "body", 400),
    (b"".join(b"--b\r\nContent-Disposition: form-data; name=p%d\r\n\r\nx\r\n" % i
              for i in range(5)) + b"--b--", "multipart/form-data; boundary=b", "body", 413),
    (b"--b\r\nContent-Disposition: form-data; name=big\r\n\r\n" + b"x" * 101 + b"\r\n--b--",
     "multipart/form-data; boundary=b", "big", 413),
])
def test_bad_or_oversized_forms_name_the_field(body, content_type, field, status) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_form(body, content_type, max_parts=4, max_part_bytes=100)
    assert (info.value.field, info.value.status) == (field, status), str(info.value)


# ---------------------------------------------------------------- POST /new_job


def test_defaults_are_the_official_servers() -> None:
    job = parse({"steps": steps(3), "num_steps_to_predict": 2})
    start = job.start
    assert job.parallel == 1
    assert (start.temperature, start.top_k, start.top_p, start.max_context) == (0.9, None, 1.0, 10)
    assert start.steps_total == 3  # N + 1 predictions, dream_step_index 0..N
    assert [i.shape for i in start.images] == [(3, 18, 30)] * 3  # resized to the model's size
    # sticks binned with the official edges: 0.15 -> 6, -1.0 -> 0, 0.0 -> 5, 0.97 -> 10
    assert start.actions.tolist() == [[0] * 12 + [6, 0, 5, 10]] * 3


def test_the_demonstrators_text_settings_and_float_tokens() -> None:
    tokens = [1.0, 2.0, 3.0, 4.0, 5.0, 49.0]
    job = parse(job_json(steps(3, tokens=tokens), predict=4, parallel=3, temperature="0.5",
                         top_k="7", top_p="0.8", max_context_length="2"))
    start = job.start
    assert (job.parallel, start.temperature, start.top_k, start.top_p) == (3, 0.5, 7, 0.8)
    assert start.max_context == 2 and len(start.tokens) == 2  # the newest 2 steps
    assert start.tokens[0].tolist() == [1, 2, 3, 4, 5, 49] and start.images == [None, None]
    short = parse(job_json(steps(3, tokens=[1.0, 2.0]), predict=0))  # not the model's count
    assert short.start.tokens == [None] * 3 and short.start.images[0] is not None


@pytest.mark.parametrize(("change", "field"), [
    ({"num_steps_to_predict": None}, "json.num_steps_to_predict"),
    ({"num_steps_to_predict": 6}, "json.num_steps_to_predict"),  # > max_dream_steps_per_job
    ({"num_steps_to_predict": -1}, "json.num_steps_to_predict"),
    ({"num_steps_to_predict": "three"}, "json.num_steps_to_predict"),
    ({"num_parallel_predictions": 5}, "json.num_parallel_predictions"),  # > max concurrent
    ({"num_parallel_predictions": 0}, "json.num_parallel_predictions"),
    ({"temperature": "hot"}, "json.temperature"),
    ({"temperature": "None"}, "json.temperature"),
    ({"top_p": "0"}, "json.top_p"),
    ({"top_k": 1.5}, "json.top_k"),
    ({"max_context_length": 0}, "json.max_context_length"),
    ({"steps": []}, "json.steps"),
    ({"steps": steps(MAX_STEPS + 1)}, "json.steps"),
    ({"steps": [{"action": [0] * 16}]}, "json.steps[0].image_name"),
    ({"steps": [{"image_name": "image0.png"}]}, "json.steps[0].action"),
    ({"steps": steps(2) + [{"image_name": "image9.png", "action": [0] * 16}]},
     "json.steps[2].image_name"),  # named, never uploaded
    ({"steps": [{"image_name": "image0.png", "action": [0] * 15}]}, "json.steps[0].action"),
    ({"steps": steps(1, tokens=[0, 1, 2, 3, 4, 50])}, "json.steps[0].tokens"),
    ({"future_actions": [{"action": [0] * 3}]}, "json.future_actions[0].action"),
    ({"future_actions": [[0] * 16]}, "json.future_actions[0]"),
])
def test_bad_jobs_name_their_field(change: dict, field: str) -> None:
    job = {"steps": steps(3), "num_steps_to_predict": 2, **change}
    job = {k: v for k, v in job.items() if v is not None}
    with pytest.raises(ProtocolError) as info:
        parse(job)
    assert info.value.field == field and info.value.status == 400, str(info.value)


def test_a_missing_json_field_bad_json_and_an_undecodable_image() -> None:
    body, content_type = dotnet_form([("image0.png", "image0.png", "image/png", png(0))])
    parts = parse_form(body, content_type, max_parts=4, max_part_bytes=2**20)
    with pytest.raises(ProtocolError, match="json: missing"):
        parse_new_job(parts, shape=SHAPE, limits=LIMITS)
    with pytest.raises(ProtocolError, match="json: not valid JSON"):
        parse(b"{steps: [}")
    with pytest.raises(ProtocolError) as info:
        parse({"steps": steps(1), "num_steps_to_predict": 1}, {"image0.png": b"GIF89a junk"})
    assert info.value.field == "files[image0.png]"
    assert "not a readable PNG or JPEG image" in str(info.value)


# ---------------------------------------------------------------- steps and results


def _result(step, action: list[int], tokens: list[int]) -> StepResult:  # noqa: ANN001
    frame = np.full((3, 18, 30), 7, np.uint8)
    return step_result(step, ScoreResult(image=frame, action=np.array(action),
                                         tokens=np.array(tokens)), text={}, watermark=False)


def test_steps_slide_the_context_and_future_actions_replace_the_models() -> None:
    job = parse({"steps": steps(3), "num_steps_to_predict": 2, "max_context_length": 3,
                 "future_actions": [{"action": [1.0] + [0.0] * 11 + [0.5, 0, 0, 0]}]})
    state = job.start
    step = next_step(state)
    assert (step.step, step.seed, step.given.tolist()) == (0, job_seed(0, 0), [1] + [0] * 11 +
                                                           [8, 5, 5, 5])
    step.tokens = [np.arange(6) + k for k in range(3)]  # what the engine call encodes
    first = _result(step, [0] * 12 + [1, 2, 3, 4], [9] * 6)
    assert first.action.tolist() == [1] + [0] * 11 + [8, 5, 5, 5]  # the given one, reported
    state = advance(state, step, first)
    assert state.steps_done == 1 and len(state.future) == 0
    assert [t.tolist() for t in state.tokens] == [[1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7],
                                                  [9] * 6]  # the oldest step slid out
    assert state.images == [None] * 3
    assert state.actions[-1].tolist() == first.action.tolist()
    second = _result(next_step(state), [0] * 12 + [1, 2, 3, 4], [8] * 6)
    assert second.action.tolist() == [0] * 12 + [1, 2, 3, 4]  # no future action left: the model's
    assert next_step(state).seed == job_seed(0, 1) != job_seed(0, 0)


def test_the_results_zip_holds_the_pngs_and_predictions() -> None:
    step = next_step(parse({"steps": steps(1), "num_steps_to_predict": 0}).start)
    step.job_id = "abc"
    result = _result(step, [1] * 12 + [0, 4, 9, 10], [3, 1, 4, 1, 5, 9])
    with zipfile.ZipFile(io.BytesIO(results_zip([result]))) as archive:
        assert sorted(archive.namelist()) == ["abc_0.png", "predictions.json"]
        (prediction,) = json.loads(archive.read("predictions.json"))
        with Image.open(io.BytesIO(archive.read("abc_0.png"))) as img:
            assert (img.format, img.size) == ("PNG", (30, 18))
    assert prediction == {"job_id": "abc", "dream_step_index": 0,
                          "action": [1.0] * 12 + [-1.0, -0.15, 0.85, 1.0],
                          "tokens": [3, 1, 4, 1, 5, 9], "image_filename": "abc_0.png"}
