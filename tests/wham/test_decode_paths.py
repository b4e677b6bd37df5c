"""The eager, static (fixed-shape) and flash decode paths give the same logits and tokens.

flash-attn needs CUDA, so its KV-cache kernel is replaced by the pure-torch stand-in in
`flash_standin`; the engine's flash path then runs on the CPU in float32."""

from __future__ import annotations

import flash_standin
import numpy as np
import pytest
import torch

from workers.wham import gpt as gpt_module
from workers.wham.engine import RolloutEngine
from workers.wham.errors import InputError
from workers.wham.model import random_model
from workers.wham.naive import naive_rollout
from workers.wham.sampling import SamplingParams

PATHS = ("eager", "static", "flash")


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=2)


@pytest.fixture(autouse=True)
def flash(monkeypatch):
    monkeypatch.setattr(gpt_module, "flash_attn_with_kvcache",
                        flash_standin.flash_attn_with_kvcache)


def _inputs(model, *, batch: int, context: int, steps: int) -> dict:
    rng = np.random.default_rng(3)
    h, w = model.image_size
    return {
        "context_images": rng.integers(0, 256, (batch, context, 3, h, w), dtype=np.uint8),
        "context_actions": np.concatenate([rng.integers(0, 2, (batch, context, 12)),
                                           rng.integers(0, 11, (batch, context, 4))], axis=-1),
        "steps": steps, "mode": "full", "seeds": [11 + b for b in range(batch)],
    }


@pytest.mark.parametrize("path", PATHS)
def test_each_path_decodes_the_full_forward_logits(model, path) -> None:
    engine = RolloutEngine(model, max_batch=3, decode=path)
    assert engine.decode_path == path
    decoder = engine.decoder(2)
    idx = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.gpt(idx)[:, 29:]  # [B, 11, V]
        got = [decoder.prefill(idx[:, :30], start=0)]
        got += [decoder.decode_one_token(idx[:, p], pos=p) for p in range(30, 40)]
    torch.testing.assert_close(torch.stack(got, dim=1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", [SamplingParams(greedy=True),
                                      SamplingParams(temperature=1.0)], ids=["greedy", "sampled"])
def test_every_path_gives_the_naive_tokens(model, sampling) -> None:
    kw = _inputs(model, batch=2, context=8, steps=3)  # fills, then slides
    want = naive_rollout(model, **kw, sampling=sampling)
    for path in PATHS:
        got = list(RolloutEngine(model, max_batch=2, decode=path).rollout(**kw, sampling=sampling))
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.image_tokens, b.image_tokens), path
            assert torch.equal(a.actions, b.actions), path


def test_flash_path_appends_keys_in_place_at_cache_seqlens(model) -> None:
    engine = RolloutEngine(model, max_batch=1, decode="flash")
    decoder = engine.decoder(1)
    idx = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        decoder.prefill(idx[:, :5], start=0)
        before = engine.cache.k[:, :, :, :5].clone()
        decoder.decode_one_token(idx[:, 5], pos=5)
    assert torch.equal(engine.cache.k[:, :, :, :5], before)
    assert engine.cache.k[:, :, :, 5].abs().sum() > 0  # the new key landed at position 5
    assert engine.cache.k[:, :, :, 6:].abs().sum() == 0


def test_auto_picks_eager_on_the_cpu_and_flash_needs_the_kernel(model, monkeypatch) -> None:
    assert RolloutEngine(model, max_batch=1).decode_path == "eager"
    assert RolloutEngine(model, max_batch=1, compile=True).decode_path == "eager"
    monkeypatch.setattr(gpt_module, "flash_attn_with_kvcache", None)
    with pytest.raises(InputError, match="flash-attn"):
        RolloutEngine(model, max_batch=1, decode="flash")
    with pytest.raises(InputError, match="decode: expected one of"):
        RolloutEngine(model, max_batch=1, decode="fast")
