"""Teacher forcing under diagonal decoding's attention pattern (`teacher_forced`) against
decoding itself: the logits every image token of a diagonal (or sequential) rollout of
`naive_rollout` was sampled from are those one teacher-forced forward pass gives it, so
fine-tuning on those logits trains exactly what diagonal decoding samples from."""

from __future__ import annotations

import pytest
import torch
from support.rollouts import one_thread, rollout_inputs  # noqa: F401 (autouse)

from workers.wham.config import WHAMConfig
from workers.wham.diagonal_training import teacher_forced
from workers.wham.model import WHAMModel
from workers.wham.naive import naive_rollout
from workers.wham.rollout import prepare_rollout
from workers.wham.sampling import Sampler, SamplingParams
from workers.wham.tokenizers import ViTConfig

CONTEXT, STEPS = 2, 2


def _model(grid: tuple[int, int]) -> WHAMModel:
    rows, cols = grid
    tokenizer = ViTConfig(image_size=(4 * rows, 4 * cols), patch_size=4, transf_dim=32,
                          embedding_dim=8, num_layers=1, head_size=16, vocab_size=64)
    torch.manual_seed(1)
    return WHAMModel(WHAMConfig.for_tokenizer(tokenizer, gpt_size="tiny"), model_id="t").eval()


def _rollout(model: WHAMModel, decoding: str, monkeypatch=None):
    """(window [B, CONTEXT + STEPS, tps] of the context and the generated steps, previous
    frames [B, W, n], {(step, image position): the logits [B, V] the token was sampled
    from})."""
    inputs = rollout_inputs(model, batch=2, context=CONTEXT, steps=STEPS, mode="world_model",
                            rng_seed=3)
    r = prepare_rollout(model, **inputs, sampling=SamplingParams(temperature=1.0),
                        decoding=decoding, decode_images=False)
    n = model.tokens_per_image
    seen, sample = {}, Sampler.sample

    def recording(self, logits, *, step, position):
        if position < n:
            seen[step, position] = logits.clone()
        return sample(self, logits, step=step, position=position)

    if monkeypatch is not None:
        monkeypatch.setattr(Sampler, "sample", recording)
    out = naive_rollout(model, r)
    generated = torch.stack([torch.cat([o.image_tokens, r.given_actions[:, o.index]], dim=1)
                             for o in out], dim=1)
    window = torch.cat([r.history, generated], dim=1)
    previous = torch.cat([torch.zeros_like(window[:, :1, :n]), window[:, :-1, :n]], dim=1)
    return window, previous, seen


@pytest.mark.parametrize("grid", [(3, 4), (4, 1), (1, 5)])
@pytest.mark.parametrize("decoding", ["diagonal", "sequential"])
def test_teacher_forced_logits_are_those_decoding_samples_from(grid, decoding,
                                                                monkeypatch) -> None:
    model = _model(grid)
    window, previous, seen = _rollout(model, decoding, monkeypatch)
    b, w, _ = window.shape
    first = torch.full((b,), CONTEXT if decoding == "diagonal" else w)
    tf = teacher_forced(window, previous, grid=grid, first_diagonal=first)
    with torch.no_grad():
        logits = model.gpt(tf.inputs, tf.mask, positions=tf.positions)  # [B, L, V]
    n = model.tokens_per_image
    assert len(seen) == STEPS * n
    for f in range(CONTEXT, w):
        for t in range(n):
            got = logits[torch.arange(b), tf.sources[:, f, t]]
            torch.testing.assert_close(got, seen[f - CONTEXT, t], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, f=f, t=t: f"frame {f} token {t}: {m}")
            assert torch.equal(tf.targets[:, f, t], window[:, f, t])


def test_nothing_attends_to_a_ghost_and_a_ghost_sees_only_generated_diagonals() -> None:
    grid = (3, 4)
    model = _model(grid)
    window, previous, _ = _rollout(model, "diagonal")
    tps = model.tokens_per_step
    tf = teacher_forced(window, previous, grid=grid, first_diagonal=torch.tensor([1, 4]))
    s = window.shape[1] * tps - 1
    mask = tf.mask[:, 0]
    assert not mask[:, :s, s:].any()  # real positions never see a ghost
    assert tf.inputs.shape[1] == s + window.shape[1] * (grid[0] - 1)
    # sample 0, frame 1, row 2's ghost: fed frame 0's token (1, 3) at frame 1's position 7
    ghost = s + 1 * 2 + 1
    assert tf.positions[ghost] == tps + 7 and torch.equal(tf.inputs[:, ghost], previous[:, 1, 7])
    seen = mask[0, ghost].nonzero().flatten().tolist()
    assert seen == [*range(tps), tps + 0, tps + 1, tps + 4, ghost]  # diagonals 0 and 1
    assert tf.sources[0, 1, 8] == ghost and tf.sources[1, 1, 8] == tps + 7  # causal: raster
