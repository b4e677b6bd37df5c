"""The rollout engine against the naive full-recompute sampler, plus sampling rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from support.rollouts import one_thread  # noqa: F401 (autouse)

from workers.wham.actions import validate_actions
from workers.wham.engine import RolloutEngine, StaticDecode
from workers.wham.errors import InputError
from workers.wham.model import random_model
from workers.wham.naive import naive_rollout
from workers.wham.sampling import (
    SamplingParams,
    sample_tokens,
    seeds_to_tensor,
    step_token_ranges,
)

GREEDY = SamplingParams(greedy=True)
WARM = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=0)


def _inputs(model, *, batch: int, context: int, steps: int, mode: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, w = model.image_size

    def images(t):
        return rng.integers(0, 256, (batch, t, 3, h, w), dtype=np.uint8)

    def actions(t):
        return np.concatenate(
            [rng.integers(0, 2, (batch, t, 12)), rng.integers(0, 11, (batch, t, 4))], axis=-1
        )

    kw = {"context_images": images(context), "context_actions": actions(context),
          "steps": steps, "mode": mode, "seeds": [100 + b for b in range(batch)]}
    if mode == "world_model":
        kw["actions"] = actions(steps)
    if mode == "policy":
        kw["observations"] = images(steps)
    return kw


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.image_tokens, y.image_tokens) and torch.equal(x.actions, y.actions)
        and np.array_equal(x.images, y.images) and x.action_source == y.action_source
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("mode", ["full", "world_model", "policy"])
@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "sampled"])
def test_engine_equals_naive_full_recompute(model, mode: str, sampling) -> None:
    # context 8 + 3 steps crosses the point where the window fills and starts to slide
    kw = _inputs(model, batch=2, context=8, steps=3, mode=mode)
    engine = RolloutEngine(model, max_batch=4)
    fast = list(engine.rollout(**kw, sampling=sampling))
    slow = naive_rollout(model, **kw, sampling=sampling)
    assert _same(fast, slow)
    assert [o.index for o in fast] == [0, 1, 2]
    assert fast[0].action_source == ("given" if mode == "world_model" else "model")


@pytest.mark.parametrize("batch", [1, 4])
def test_the_engines_prepacked_model_matches_an_unpacked_copy(model, batch: int) -> None:
    plain = copy.deepcopy(model)
    engine = RolloutEngine(model, max_batch=4, prepack=True)
    assert not any(getattr(m, "prepacked", False) for m in model.modules())  # left as given
    if not any(getattr(m, "prepacked", False) for m in engine.gpt.modules()):
        pytest.skip("this torch build has no oneDNN linear")
    idx = torch.randint(0, 64, (batch, 150), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        torch.testing.assert_close(engine.gpt(idx), plain.gpt(idx), rtol=1e-4, atol=1e-4)
        cached = engine.decoder(batch).prefill(idx, start=0)
        torch.testing.assert_close(cached, plain.gpt(idx)[:, -1], rtol=1e-4, atol=1e-4)
    kw = _inputs(model, batch=batch, context=3, steps=2, mode="full", seed=batch)
    packed = list(engine.rollout(**kw, sampling=GREEDY))
    unpacked = naive_rollout(plain, **kw, sampling=GREEDY)
    assert _same(packed, unpacked)


def test_context_tokens_replace_images_and_pixel_decoding_is_optional(model) -> None:
    kw = _inputs(model, batch=2, context=3, steps=2, mode="full")
    engine = RolloutEngine(model, max_batch=2)
    from_images = list(engine.rollout(**kw, sampling=WARM))
    tokens = model.encode_images(kw.pop("context_images"))
    from_tokens = list(engine.rollout(**kw, context_tokens=tokens, sampling=WARM,
                                      decode_images=False))
    for a, b in zip(from_images, from_tokens, strict=True):
        assert torch.equal(a.image_tokens, b.image_tokens) and b.images is None
    with pytest.raises(InputError, match=r"context_tokens: image tokens must lie in \[0, 64\)"):
        engine.rollout(**kw, context_tokens=tokens + 64)


def test_world_model_uses_the_given_actions(model) -> None:
    kw = _inputs(model, batch=2, context=2, steps=2, mode="world_model")
    out = list(RolloutEngine(model, max_batch=2).rollout(**kw))
    given = np.asarray(kw["actions"])
    for o in out:
        assert np.array_equal(o.actions.numpy(), given[:, o.index])


def test_prefill_once_per_step_when_full_and_extend_while_filling(model) -> None:
    engine = RolloutEngine(model, max_batch=2)
    list(engine.rollout(**_inputs(model, batch=1, context=10, steps=3, mode="full")))
    assert (engine.window.prefills, engine.window.extends) == (3, 0)
    engine = RolloutEngine(model, max_batch=2)
    list(engine.rollout(**_inputs(model, batch=1, context=1, steps=4, mode="full")))
    assert (engine.window.prefills, engine.window.extends) == (1, 3)
    engine = RolloutEngine(model, max_batch=2)  # fills (context 7, 8, 9) then slides (10)
    list(engine.rollout(**_inputs(model, batch=1, context=7, steps=4, mode="world_model")))
    assert (engine.window.prefills, engine.window.extends) == (2, 2)


def test_short_history_cap_matches_naive(model) -> None:
    kw = _inputs(model, batch=1, context=2, steps=3, mode="full")
    engine = RolloutEngine(model, max_batch=1)
    fast = list(engine.rollout(**kw, sampling=GREEDY, max_context=2))
    assert _same(fast, naive_rollout(model, **kw, sampling=GREEDY, max_context=2))
    assert engine.window.prefills == 3  # the 2-step history drops its oldest step every step


def test_batched_equals_one_by_one(model) -> None:
    kw = _inputs(model, batch=3, context=3, steps=2, mode="full", seed=5)
    engine = RolloutEngine(model, max_batch=4)
    together = list(engine.rollout(**kw, sampling=WARM))
    for b in range(3):
        single = {**kw, "context_images": kw["context_images"][b:b + 1],
                  "context_actions": kw["context_actions"][b:b + 1], "seeds": [kw["seeds"][b]]}
        alone = list(engine.rollout(**single, sampling=WARM))
        for x, y in zip(together, alone, strict=True):
            assert torch.equal(x.image_tokens[b], y.image_tokens[0])
            assert torch.equal(x.actions[b], y.actions[0])


def test_interleaved_rollouts_on_one_engine_are_refused(model) -> None:
    engine = RolloutEngine(model, max_batch=1)
    kw = _inputs(model, batch=1, context=1, steps=2, mode="full")
    first = engine.rollout(**kw)
    next(first)
    assert len(list(engine.rollout(**kw))) == 2
    with pytest.raises(RuntimeError, match="another rollout ran"):
        next(first)


def test_seeds_decide_the_samples(model) -> None:
    kw = _inputs(model, batch=2, context=2, steps=1, mode="full")
    engine = RolloutEngine(model, max_batch=2)
    a = list(engine.rollout(**kw, sampling=WARM))[0]
    b = list(engine.rollout(**kw, sampling=WARM))[0]
    c = list(engine.rollout(**{**kw, "seeds": [7, 8]}, sampling=WARM))[0]
    assert torch.equal(a.image_tokens, b.image_tokens)
    assert not torch.equal(a.image_tokens, c.image_tokens)


def test_seeds_accept_any_python_int_and_reject_the_rest() -> None:
    seeds = seeds_to_tensor([0, 2**63 - 1, 2**64 + 5, np.int64(-3)], batch=4,
                            device=torch.device("cpu"))
    assert seeds.tolist() == [0, 2**63 - 1, 5, -3]
    with pytest.raises(InputError, match=r"seeds\[1\]: expected an integer"):
        seeds_to_tensor([1, 2.5], batch=2, device=torch.device("cpu"))


def test_outputs_stay_in_their_ranges_and_first_image_token_is_never_zero() -> None:
    """Force token 0 to dominate every position: ln_f outputs a constant c and wte[0] = c.
    Greedy decoding must still keep the first image token off 0 and actions in range."""
    model = random_model("tiny", seed=1)
    with torch.no_grad():
        ln_f = model.gpt.transformer.ln_f
        ln_f.weight.zero_()
        ln_f.bias.copy_(torch.linspace(-1, 1, ln_f.bias.numel()))
        model.gpt.transformer.wte.weight[0] = 10 * ln_f.bias
    out = list(RolloutEngine(model, max_batch=2).rollout(
        **_inputs(model, batch=2, context=1, steps=2, mode="full"), sampling=GREEDY))
    v_img = model.image_vocab_size
    for o in out:
        assert (o.image_tokens[:, 0] >= 1).all()
        assert (o.image_tokens[:, 1:] == 0).all()  # the rest may take the favourite
        assert (o.image_tokens < v_img).all()
        validate_actions(o.actions.numpy())  # buttons 0/1, sticks 0..10, else InputError
        assert o.images.shape == (2, 3, *model.image_size) and o.images.dtype == np.uint8


def test_temperature_is_clamped_and_validated() -> None:
    assert SamplingParams(temperature=0.0).effective_temperature == 0.1
    assert SamplingParams(temperature=0.5).effective_temperature == 0.5
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    seeds = torch.arange(4)
    kw = {"lo": 0, "hi": 49, "seeds": seeds, "counter": 3}
    cold = sample_tokens(logits, params=SamplingParams(temperature=0.0), **kw)
    clamped = sample_tokens(logits, params=SamplingParams(temperature=0.1), **kw)
    assert torch.equal(cold, clamped)
    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": 0},
                {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(InputError):
            SamplingParams(**bad)


def test_gumbel_sampler_draws_from_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]])
    kw = {"lo": 0, "hi": 3, "seeds": torch.tensor([42])}
    params = SamplingParams(temperature=1.0)
    draws = torch.stack([sample_tokens(logits, params=params, counter=c, **kw)
                         for c in range(4000)]).flatten()
    assert (draws <= 3).all()  # token 4 is outside the valid range
    freq = torch.bincount(draws, minlength=4)[:4].float() / len(draws)
    expected = logits[0, :4].softmax(-1)
    assert (freq - expected).abs().max() < 0.03
    top1 = sample_tokens(logits, params=SamplingParams(top_k=1), counter=0, **kw)
    assert top1.tolist() == [0]
    nucleus = sample_tokens(logits, params=SamplingParams(top_p=0.5), counter=1, **kw)
    assert nucleus.tolist() == [0]  # p(token 0) = 0.64 alone exceeds 0.5


def test_step_token_ranges_follow_the_vocabulary_layout() -> None:
    ranges = step_token_ranges(image_vocab_size=100, tokens_per_image=3)
    assert ranges[:3].tolist() == [[1, 99], [0, 99], [0, 99]]
    assert ranges[3].tolist() == [100, 101]  # button 0
    assert ranges[3 + 11].tolist() == [122, 123]  # button 11
    assert ranges[3 + 12].tolist() == [124, 134]  # left stick x, bins 0..10
    assert ranges[-1].tolist() == [157, 167]


def test_static_decode_module_equals_eager_decode(model) -> None:
    engine = RolloutEngine(model, max_batch=2)
    static = StaticDecode(model.gpt, engine.cache)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    k, v = engine.cache.rows(2)
    with torch.no_grad():
        model.gpt.forward_cached(idx[:, :11], k_cache=k, v_cache=v, start=0)
        got = static(idx[:, 11:], torch.tensor([11]))
        want = model.gpt(idx)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"context_images": np.zeros((2, 2, 3, 8, 8), np.uint8)},
         r"context_images: .*\(2, T, 3, 16, 16\)"),
        ({"context_actions": np.zeros((2, 2, 15), np.int64)}, r"context_actions: expected shape"),
        ({"context_actions": np.full((2, 2, 16), 11)}, r"context_actions: trigger_LT .* is 11"),
        ({"seeds": [1]}, r"seeds: expected 2 seeds"),
        ({"mode": "dream"}, r"mode: expected one of"),
        ({"steps": -1}, r"steps: expected"),
        ({"context_images": np.zeros((2, 11, 3, 16, 16), np.uint8),
          "context_actions": np.zeros((2, 11, 16), np.int64)}, r"context_images: expected 1\.\.10"),
        ({"actions": np.zeros((2, 2, 16), np.int64)}, r"actions: only used in world_model"),
    ],
)
def test_bad_inputs_raise_input_errors_naming_the_argument(model, change, message) -> None:
    kw = {**_inputs(model, batch=2, context=2, steps=2, mode="full"), **change}
    with pytest.raises(InputError, match=message):
        RolloutEngine(model, max_batch=2).rollout(**kw)


def test_batch_and_mode_requirements(model) -> None:
    engine = RolloutEngine(model, max_batch=1)
    with pytest.raises(InputError, match="max_batch=1"):
        engine.rollout(**_inputs(model, batch=2, context=1, steps=1, mode="full"))
    kw = _inputs(model, batch=1, context=1, steps=2, mode="world_model")
    with pytest.raises(InputError, match="actions: expected shape"):
        engine.rollout(**{**kw, "actions": kw["actions"][:, :1]})
    kw = _inputs(model, batch=1, context=1, steps=2, mode="policy")
    with pytest.raises(InputError, match="observations: policy mode needs"):
        engine.rollout(**{**kw, "observations": None})
