"""`output.frames` and `output.video` in the spec, and the rollout quality aggregates."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from pipeline.contracts import quality
from pipeline.contracts.errors import UserError
from pipeline.contracts.spec import spec_from_data


def _spec(**output):
    return spec_from_data({
        "run": {"name": "t"}, "model": {"preset": "tiny"}, "seeds": {"source": "s"},
        "rollouts": {"steps": 2}, "output": {"root": "out", **output}})


def test_frames_modes_and_the_version_1_booleans():
    assert _spec().output.frames == "parquet"
    assert _spec(frames="png").output.frames == "png"
    assert _spec(frames=True).output.frames == "png"
    assert _spec(frames=False).output.frames == "none"
    with pytest.raises(UserError, match="output.frames"):
        _spec(frames="jpeg")


def test_frames_none_needs_the_tokens():
    with pytest.raises(UserError, match="image_tokens: true"):
        _spec(frames="none", image_tokens=False)
    assert _spec(frames="parquet", image_tokens=False).output.image_tokens is False


def test_an_endpoint_run_stores_frames():
    data = {"run": {"name": "t"}, "model": {"endpoint": "http://127.0.0.1:9/score"},
            "seeds": {"source": "s"}, "rollouts": {"steps": 2},
            "output": {"root": "out", "frames": "none"}}
    with pytest.raises(UserError, match="output.frames none"):
        spec_from_data(data)
    data["output"]["frames"] = "parquet"
    assert spec_from_data(data).output.frames == "parquet"


def test_video_needs_pyav(monkeypatch):
    assert _spec(video=True).output.video is True
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "av" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install -e .\.\[video\]."):
        _spec(video=True)


NAN = float("nan")


def _steps(image_lp, changed, action_lp=None):
    n = len(image_lp)
    action_lp = [NAN] * n if action_lp is None else action_lp
    return {"image_logprob": np.array(image_lp, np.float32),
            "image_entropy": np.full(n, 0.5, np.float32),
            "action_logprob": np.array(action_lp, np.float32),
            "action_entropy": np.full(n, NAN if action_lp[0] != action_lp[0] else 0.25,
                                      np.float32),
            "changed_fraction": np.array(changed, np.float32)}


def test_rollout_aggregates_against_plain_arithmetic():
    threshold = quality.collapse_logprob(256)
    assert threshold == pytest.approx(-0.5 * math.log(256))
    lp = [-0.1, -0.3, threshold - 0.1, -0.2, threshold - 1]
    out = quality.rollout_quality(_steps(lp, [0.5, 0.25, 0.0, 0.0, 0.0]), first_step=3,
                                  tokens_per_image=540, image_vocab_size=256)
    assert out["mean_logprob"] == pytest.approx(sum(lp) / 5, rel=1e-6)
    assert out["min_logprob"] == pytest.approx(threshold - 1, rel=1e-6)
    assert out["mean_entropy"] == pytest.approx(0.5)
    assert out["mean_changed_fraction"] == pytest.approx(0.15)
    assert out["frozen"] is True  # the last 3 frames did not change
    assert out["collapse_step"] == 3 + 2  # steps-table number of the first collapsed step
    calm = quality.rollout_quality(_steps([-0.1] * 4, [0.5, 0.0, 0.0, 0.1]), first_step=1,
                                   tokens_per_image=16, image_vocab_size=256)
    assert calm["frozen"] is False and calm["collapse_step"] is None


def test_image_and_action_tokens_weigh_by_count():
    out = quality.rollout_quality(_steps([-1.0, -1.0], [0.5, 0.5], action_lp=[-2.0, -4.0]),
                                  first_step=1, tokens_per_image=48, image_vocab_size=64)
    # per step: (48 * image + 16 * action) / 64
    assert out["mean_logprob"] == pytest.approx(((48 * -1 + 16 * -2) + (48 * -1 + 16 * -4))
                                                / 128)
    assert out["mean_entropy"] == pytest.approx((48 * 0.5 + 16 * 0.25) / 64)
    policy = quality.rollout_quality(_steps([NAN, NAN], [0.5, 0.5], action_lp=[-2.0, -4.0]),
                                     first_step=1, tokens_per_image=48, image_vocab_size=64)
    assert policy["mean_logprob"] == pytest.approx(-3.0) and policy["collapse_step"] is None
