"""Per-step quality statistics: log-probability and entropy of the sampled tokens (on the
model's temperature-1 distribution over each position's valid range) and the fraction of
image tokens changed from the previous frame."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support.rollouts import rollout_inputs

from workers.wham.checkpoints import load_model
from workers.wham.engine import RolloutEngine
from workers.wham.model import random_model
from workers.wham.naive import naive_rollout
from workers.wham.sampling import Sampler, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
STATS = ("image_logprob", "image_entropy", "action_logprob", "action_entropy",
         "changed_fraction")


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=4)


def _inputs(model, *, batch: int, context: int, steps: int, mode: str) -> dict:
    return rollout_inputs(model, batch=batch, context=context, steps=steps, mode=mode,
                          rng_seed=7, first_seed=5)


def test_sampler_stats_are_the_valid_range_distribution_at_temperature_one() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(SamplingParams(temperature=0.3, top_k=2), ranges=[(2, 9), (12, 14)],
                      tokens_per_image=1, seeds=torch.arange(3), vocab_size=20)
    image = sampler.sample(logits, step=0, position=0)
    action = sampler.sample(logits, step=0, position=1)
    stats = sampler.take_stats()
    for tokens, (lo, hi), kind in ((image, (2, 9), "image"), (action, (12, 14), "action")):
        logp = logits[:, lo:hi + 1].log_softmax(dim=-1)
        want_lp = logp.gather(1, (tokens - lo)[:, None])[:, 0]
        want_ent = -(logp.exp() * logp).sum(dim=-1)
        torch.testing.assert_close(stats[f"{kind}_logprob"], want_lp)
        torch.testing.assert_close(stats[f"{kind}_entropy"], want_ent)
    assert all(s.dtype == torch.float32 and s.shape == (3,) for s in stats.values())
    assert torch.isnan(sampler.take_stats()["image_logprob"]).all()  # reset after taking


@pytest.mark.parametrize("mode", ["full", "world_model", "policy"])
def test_engine_stats_match_the_naive_path(model, mode: str) -> None:
    kw = _inputs(model, batch=2, context=8, steps=3, mode=mode)
    sampling = SamplingParams(temperature=1.0)
    fast = list(RolloutEngine(model, max_batch=2).rollout(**kw, sampling=sampling))
    slow = naive_rollout(model, **kw, sampling=sampling)
    for a, b in zip(fast, slow, strict=True):
        for name in STATS:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5,
                                       atol=1e-5, equal_nan=True)
    images_sampled, actions_sampled = mode != "policy", mode != "world_model"
    for o in fast:
        assert bool(torch.isnan(o.image_logprob).any()) != images_sampled
        assert bool(torch.isnan(o.action_entropy).any()) != actions_sampled
        assert ((o.changed_fraction >= 0) & (o.changed_fraction <= 1)).all()
        if images_sampled:
            assert (o.image_logprob <= 0).all() and (o.image_entropy >= 0).all()


def test_changed_fraction_counts_tokens_that_differ_from_the_previous_frame(model) -> None:
    kw = _inputs(model, batch=2, context=3, steps=2, mode="full")
    outs = list(RolloutEngine(model, max_batch=2).rollout(**kw))
    last_context = model.encode_images(kw["context_images"][:, -1:])[:, 0]  # [B, n]
    want = (outs[0].image_tokens != last_context).float().mean(dim=1)
    assert torch.equal(outs[0].changed_fraction, want)
    want = (outs[1].image_tokens != outs[0].image_tokens).float().mean(dim=1)
    assert torch.equal(outs[1].changed_fraction, want)


def test_a_rows_stats_do_not_depend_on_its_batch(model) -> None:
    kw = _inputs(model, batch=3, context=2, steps=2, mode="full")
    engine = RolloutEngine(model, max_batch=3)
    together = list(engine.rollout(**kw, sampling=SamplingParams(temperature=1.0)))
    for b in range(3):
        alone = list(engine.rollout(
            **{**kw, "context_images": kw["context_images"][b:b + 1],
               "context_actions": kw["context_actions"][b:b + 1], "seeds": [kw["seeds"][b]]},
            sampling=SamplingParams(temperature=1.0)))
        for x, y in zip(together, alone, strict=True):
            for name in STATS:
                assert torch.equal(getattr(x, name)[b:b + 1], getattr(y, name)), name


def test_greedy_rollouts_are_more_probable_than_hot_ones_on_the_demo_model() -> None:
    demo = load_model(ROOT / "models" / "demo")
    seeds = sorted((ROOT / "configs" / "seeds" / "toygame").glob("*.npz"))[:4]
    clips = [np.load(p, allow_pickle=False) for p in seeds]
    images = np.stack([c["images"] for c in clips])
    actions = np.stack([c["actions"] for c in clips])
    engine = RolloutEngine(demo, max_batch=len(clips))

    def mean_logprob(sampling: SamplingParams) -> float:
        outs = engine.rollout(context_images=images[:, :4], context_actions=actions[:, :4],
                              steps=4, mode="world_model", actions=actions[:, 4:8],
                              sampling=sampling, seeds=list(range(len(clips))))
        return float(torch.stack([o.image_logprob for o in outs]).mean())

    greedy, hot = mean_logprob(SamplingParams(greedy=True)), mean_logprob(
        SamplingParams(temperature=1.5))
    assert math.isfinite(greedy) and greedy > hot, (greedy, hot)
