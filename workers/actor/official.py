"""The official local-server protocol: the one `run_server.py` of the WHAM release speaks
and the WHAM Demonstrator's "Local Server" mode calls. Requests, job state and results.

    GET  /                       {"model_file", "max_concurrent_jobs",
                                  "max_dream_steps_per_job", "max_job_lifespan"}
    POST /new_job                a multipart form: a `json` field
                                   {"steps": [{"image_name", "action", "tokens"}, ...],
                                    "num_steps_to_predict": N, "num_parallel_predictions": 1,
                                    "temperature": 0.9, "top_k": null, "top_p": 1.0,
                                    "max_context_length": 10,
                                    "future_actions": [{"action": [16]}, ...]}
                                 and one file per image, the form field named by image_name
                                 -> {"job_ids": [...], "current_jobs_in_queue": n}
    GET  /get_job_results?job_ids=a&job_ids=b
                                 a zip of `<job_id>_<step>.png` plus `predictions.json`
                                 ([{"job_id", "dream_step_index", "action", "tokens",
                                 "image_filename"}]): every result since the last poll; 204
                                 when there is none
    GET  /cancel_job?job_id=a

What the official server does and this codec keeps: a job of `num_steps_to_predict` N
predicts N + 1 frames (dream_step_index 0..N: its worker predicts once more when the count
reaches zero); `num_parallel_predictions` jobs start from one request; the sampling settings
may come as numbers or as text (the Demonstrator sends text; "none" leaves one unset);
actions are 12 buttons then 4 sticks in [-1, 1], binned with the official bin edges
(`workers.actor.muse.official_to_model`) and returned at the bin centres; `future_actions[k]`
replaces the model's action of step k (returned and fed back). Where it differs: a context
longer than `max_context_length` (at most the model's window) keeps its newest steps (the
official server keeps the oldest for the first step), images are resized to the model's size
with Lanczos (the official server uses OpenCV's bilinear), the image files are PNG or JPEG,
and bad requests get 400 with `{"error", "field"}` where the official server answers 500.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from workers.actor.encode import encode_png
from workers.actor.multipart import Part
from workers.actor.muse import (
    MAX_CONTEXT_ENTRIES,
    MAX_SEED,
    ModelShape,
    ProtocolError,
    ScoreRequest,
    ScoreResult,
    frame_from_bytes,
    model_to_official,
    official_to_model,
    read_json,
)

PREDICTIONS_FILE = "predictions.json"
#: The official server's defaults (run_server.py's flags and DEFAULT_SAMPLING_SETTINGS).
MAX_CONCURRENT_JOBS = 30
MAX_DREAM_STEPS_PER_JOB = 10
MAX_JOB_LIFESPAN_S = 600
DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_CONTEXT = 0.9, 1.0, 10
#: Bounds of one request: steps and future actions, form parts, the `json` field.
MAX_STEPS = MAX_CONTEXT_ENTRIES
MAX_FORM_PARTS = MAX_STEPS + 16
MAX_JSON_BYTES = 4 * 2**20


@dataclass(frozen=True, slots=True)
class JobLimits:
    """The server's limits, as the official server's flags name them."""

    max_concurrent_jobs: int = MAX_CONCURRENT_JOBS
    max_dream_steps_per_job: int = MAX_DREAM_STEPS_PER_JOB
    max_job_lifespan_s: int = MAX_JOB_LIFESPAN_S


@dataclass(slots=True)
class JobState:
    """Everything the next step of a job needs, so that any replica can run it."""

    job_id: str
    seed: int
    steps_total: int  # num_steps_to_predict + 1
    steps_done: int
    temperature: float
    top_k: int | None
    top_p: float
    max_context: int
    images: list[np.ndarray | None]  # uint8 (3,H,W) where the tokens are not known yet
    tokens: list[np.ndarray | None]  # int64 (n,) where known
    actions: np.ndarray  # int64 (T,16) model form
    future: np.ndarray  # int64 (F,16): the given actions of the next steps, first first


@dataclass(slots=True)
class NewJob:
    """A parsed `POST /new_job`: the state its jobs start from and how many to start."""

    start: JobState
    parallel: int


@dataclass(slots=True)
class JobStep(ScoreRequest):
    """One step of a job, batched with Muse requests; the step fills in `tokens` of the
    context images it encodes."""

    job_id: str = ""
    step: int = 0
    given: np.ndarray | None = None  # the future action that replaces the model's


@dataclass(frozen=True, slots=True)
class StepResult:
    """One predicted step as the results zip carries it, plus what the next step needs."""

    job_id: str
    step: int
    png: bytes
    action: np.ndarray  # int64 (16,) model form (the given future action, when there was one)
    tokens: np.ndarray  # int64 (n,) of the unmarked frame

    @property
    def filename(self) -> str:
        return f"{self.job_id}_{self.step}.png"

    def prediction(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "dream_step_index": self.step,
                "action": model_to_official(self.action),
                "tokens": [int(t) for t in self.tokens], "image_filename": self.filename}


# ---------------------------------------------------------------- values


def _number(value: Any, name: str, *, integer: bool, low: float, high: float = math.inf,
            allow_none: bool = False) -> float | int | None:
    """A setting sent as a number or as text (the Demonstrator sends text); "none" is unset."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "null", ""):
            value = None
        else:
            try:
                value = float(text)
            except ValueError:
                raise ProtocolError(name, f"expected a number, got {text[:40]!r}") from None
    if value is None:
        if allow_none:
            return None
        raise ProtocolError(name, "expected a number, got none")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(name, f"expected a number, got {type(value).__name__}")
    try:
        ok = math.isfinite(value) and low <= value <= high
    except OverflowError:
        ok = False
    if not ok or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        upper = "" if math.isinf(high) else f" and <= {high:g}"
        raise ProtocolError(name, f"expected {kind} >= {low:g}{upper}, got {str(value)[:40]}")
    return int(value) if integer else float(value)


def _is_token(t: Any, vocab: int) -> bool:
    if isinstance(t, bool) or not isinstance(t, int | float):
        return False
    if isinstance(t, float) and not (math.isfinite(t) and t.is_integer()):
        return False
    return 0 <= t < vocab


def _tokens(value: Any, *, name: str, shape: ModelShape) -> np.ndarray | None:
    """A step's tokens when they are the model's (its count of integers in the image
    vocabulary; the Demonstrator sends them as floats); None to encode the step's image."""
    if not isinstance(value, list) or len(value) != shape.tokens_per_image:
        return None
    bad = [t for t in value if not _is_token(t, shape.image_vocab_size)]
    if bad:
        raise ProtocolError(name, f"image tokens must be integers in "
                                  f"[0, {shape.image_vocab_size}), got {str(bad[0])[:40]}")
    return np.asarray(value, dtype=np.int64)


def _action(entry: Any, name: str) -> np.ndarray:
    if not isinstance(entry, dict):
        raise ProtocolError(name, f"expected an object, got {type(entry).__name__}")
    if "action" not in entry:
        raise ProtocolError(f"{name}.action", "missing (16 numbers: 12 buttons, 4 sticks)")
    return official_to_model(entry["action"], field=f"{name}.action")


def job_seed(step_seed: int, step: int) -> int:
    """The sampling seed of one step of a job: a step rerun elsewhere draws the same."""
    digest = hashlib.blake2b(f"{step_seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & MAX_SEED


# ---------------------------------------------------------------- POST /new_job


def _form(parts: list[Part]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(the `json` field, parsed; the other parts by field name, the first of a name)."""
    fields: dict[str, bytes] = {}
    for part in parts:
        fields.setdefault(part.name, part.data)
    if "json" not in fields:
        raise ProtocolError("json", "missing: the form needs a `json` field with the job "
                                    "(steps, num_steps_to_predict, ...)")
    if len(fields["json"]) > MAX_JSON_BYTES:
        raise ProtocolError("json", f"larger than {MAX_JSON_BYTES} bytes", status=413)
    data = read_json(fields.pop("json"), field="json")
    if not isinstance(data, dict):
        raise ProtocolError("json", f"expected an object, got {type(data).__name__}")
    return data, fields


def _top_p(value: Any) -> float:
    top_p = _number(value, "json.top_p", integer=False, low=0, high=1.0)
    if top_p == 0:
        raise ProtocolError("json.top_p", "expected a number in (0, 1], got 0")
    return top_p


def _settings(data: dict[str, Any], *, limits: JobLimits, window: int) -> dict[str, Any]:
    """The counts and sampling settings of a job, with the official defaults."""
    if "num_steps_to_predict" not in data:
        raise ProtocolError("json.num_steps_to_predict", "missing (how many steps to predict)")
    steps = _number(data["num_steps_to_predict"], "json.num_steps_to_predict", integer=True,
                    low=0, high=limits.max_dream_steps_per_job)
    parallel = _number(data.get("num_parallel_predictions", 1), "json.num_parallel_predictions",
                       integer=True, low=1, high=limits.max_concurrent_jobs)
    top_k = _number(data.get("top_k"), "json.top_k", integer=True, low=1, allow_none=True)
    context = _number(data.get("max_context_length", DEFAULT_MAX_CONTEXT),
                      "json.max_context_length", integer=True, low=1, allow_none=True)
    return {
        "steps_total": steps + 1, "parallel": parallel, "top_k": top_k,
        "temperature": _number(data.get("temperature", DEFAULT_TEMPERATURE), "json.temperature",
                               integer=False, low=0),
        "top_p": _top_p(data.get("top_p", DEFAULT_TOP_P)),
        "max_context": min(window, context or window),
    }


def _steps(data: dict[str, Any], files: dict[str, bytes], *, shape: ModelShape,
           keep: int) -> tuple[list[np.ndarray | None], list[np.ndarray | None], np.ndarray]:
    """(images, tokens, actions) of the newest `keep` context steps; every step's image
    must be uploaded, the kept ones without usable tokens are decoded."""
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ProtocolError("json.steps", "expected a non-empty list of steps "
                                          "({image_name, action, tokens})")
    if len(steps) > MAX_STEPS:
        raise ProtocolError("json.steps", f"{len(steps)} steps; at most {MAX_STEPS} are "
                                          "accepted")
    images, tokens, actions = [], [], []
    for i, step in enumerate(steps):
        where = f"json.steps[{i}]"
        action = _action(step, where)
        name = step.get("image_name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"{where}.image_name", "missing (the form field of the "
                                                       "step's image file)")
        if name not in files:
            raise ProtocolError(f"{where}.image_name", f"{name[:100]!r} was not uploaded "
                                "(send each image as a form file named by its image_name)")
        if i < len(steps) - keep:
            continue  # beyond max_context_length: checked, not used
        given = _tokens(step.get("tokens"), name=f"{where}.tokens", shape=shape)
        tokens.append(given)
        images.append(None if given is not None else frame_from_bytes(
            files[name], field=f"files[{name[:100]}]", size=shape.image_size))
        actions.append(action)
    return images, tokens, np.stack(actions)


def _future(data: dict[str, Any], *, count: int) -> np.ndarray:
    future = data.get("future_actions")
    if future is None:
        return np.zeros((0, 16), dtype=np.int64)
    if not isinstance(future, list) or len(future) > MAX_STEPS:
        raise ProtocolError("json.future_actions", f"expected a list of at most {MAX_STEPS} "
                                                   "{action} objects")
    rows = [_action(e, f"json.future_actions[{k}]") for k, e in enumerate(future[:count])]
    return np.stack(rows) if rows else np.zeros((0, 16), dtype=np.int64)


def parse_new_job(parts: list[Part], *, shape: ModelShape, limits: JobLimits) -> NewJob:
    """The parts of a `POST /new_job` form -> NewJob; ProtocolError naming the field
    (`json.steps[2].image_name`, `files[image0.png]`) for anything bad."""
    data, files = _form(parts)
    settings = _settings(data, limits=limits, window=shape.window)
    images, tokens, actions = _steps(data, files, shape=shape, keep=settings["max_context"])
    start = JobState(job_id="", seed=0, steps_total=settings["steps_total"], steps_done=0,
                     temperature=settings["temperature"], top_k=settings["top_k"],
                     top_p=settings["top_p"], max_context=settings["max_context"],
                     images=images, tokens=tokens, actions=actions,
                     future=_future(data, count=settings["steps_total"]))
    return NewJob(start=start, parallel=settings["parallel"])


# ---------------------------------------------------------------- running a job


def next_step(state: JobState) -> JobStep:
    """The batched request of a job's next step."""
    given = state.future[0] if len(state.future) else None
    return JobStep(images=list(state.images), tokens=list(state.tokens),
                   actions=state.actions, temperature=state.temperature, top_k=state.top_k,
                   top_p=state.top_p, seed=job_seed(state.seed, state.steps_done),
                   job_id=state.job_id, step=state.steps_done, given=given)


def step_result(step: JobStep, result: ScoreResult, *, text: dict[str, str],
                watermark: bool) -> StepResult:
    """What the engine gave one job step, as the results carry it (the PNG is encoded here,
    in the batch's thread)."""
    action = result.action if step.given is None else step.given
    return StepResult(job_id=step.job_id, step=step.step, action=np.asarray(action),
                      png=encode_png(result.image, text=text, watermark=watermark),
                      tokens=np.asarray(result.tokens, dtype=np.int64))


def advance(state: JobState, step: JobStep, result: StepResult) -> JobState:
    """The state after `result`: its frame and action join the context (the newest
    `max_context` steps are kept), as tokens only."""
    tokens = [*step.tokens, result.tokens][-state.max_context:]
    actions = np.concatenate([step.actions, result.action[None]])[-state.max_context:]
    return replace(state, steps_done=state.steps_done + 1, images=[None] * len(tokens),
                   tokens=tokens, actions=actions, future=state.future[1:])


# ---------------------------------------------------------------- answers


def results_zip(results: list[StepResult]) -> bytes:
    """The body of a `GET /get_job_results` answer."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:  # PNGs are compressed already: stored
        for result in results:
            archive.writestr(result.filename, result.png)
        archive.writestr(PREDICTIONS_FILE, json.dumps([r.prediction() for r in results]))
    return buf.getvalue()


def server_details(*, model_file: str, model_id: str, limits: JobLimits) -> dict[str, Any]:
    """The body of `GET /`: the official server's keys, and the model's id."""
    return {"model_file": model_file, "max_concurrent_jobs": limits.max_concurrent_jobs,
            "max_dream_steps_per_job": limits.max_dream_steps_per_job,
            "max_job_lifespan": limits.max_job_lifespan_s, "model_id": model_id}
