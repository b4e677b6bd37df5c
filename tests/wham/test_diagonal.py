"""Diagonal decoding: the plan of passes, the engine against `naive_rollout` (a plain
full-sequence forward per pass under an explicit mask, over a cache filled with noise), one-row
and one-column grids against sequential decoding, batch invariance, and the eager, static and
flash (stand-in) paths against each other."""

from __future__ import annotations

import flash_standin
import pytest
import torch
from support.rollouts import one_thread, rollout_inputs  # noqa: F401 (autouse)

from workers.wham import gpt as gpt_module
from workers.wham.config import PRESETS, WHAMConfig
from workers.wham.diagonal import diagonals, plan_passes
from workers.wham.engine import RolloutEngine
from workers.wham.errors import InputError
from workers.wham.model import WHAMModel, random_model
from workers.wham.naive import _mask, naive_rollout
from workers.wham.rollout import History, prepare_rollout
from workers.wham.sampling import Sampler, SamplingParams, step_token_ranges
from workers.wham.tokenizers import ViTConfig

GREEDY = SamplingParams(greedy=True)
WARM = SamplingParams(temperature=1.0)
PATHS = ("eager", "static", "flash")
DIAGONAL = ("diagonal", "diagonal-checked")


@pytest.fixture(autouse=True)
def flash(monkeypatch):
    monkeypatch.setattr(gpt_module, "flash_attn_with_kvcache",
                        flash_standin.flash_attn_with_kvcache)


def _vit_model(grid: tuple[int, int], *, seed: int = 0) -> WHAMModel:
    """A tiny model whose ViT tokenizer has a rows x cols grid of 4x4 patches."""
    rows, cols = grid
    tokenizer = ViTConfig(image_size=(4 * rows, 4 * cols), patch_size=4, transf_dim=32,
                          embedding_dim=8, num_layers=1, head_size=16, vocab_size=64)
    torch.manual_seed(seed)
    model = WHAMModel(WHAMConfig.for_tokenizer(tokenizer, gpt_size="tiny"), model_id="test")
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=4)  # a 4 x 4 grid


def _inputs(model, *, batch: int, context: int, steps: int, mode: str, seed: int = 0) -> dict:
    return rollout_inputs(model, batch=batch, context=context, steps=steps, mode=mode,
                          rng_seed=seed, first_seed=40)


# ---- the plan ------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (2, 2), (1, 6), (6, 1), (18, 30)])
def test_each_pass_samples_one_diagonal_from_generated_positions_only(grid) -> None:
    rows, cols = grid
    diag = diagonals(grid)
    n = rows * cols
    passes = plan_passes(grid, device="cpu")
    assert len(passes) == rows + cols - 2
    sampled, fed = [0], []
    for k, p in enumerate(passes, start=1):
        assert (diag[p.targets] == k).all() and p.first == int(p.targets[0])
        assert torch.equal(p.queries[p.source], p.targets - 1)  # each from its predecessor
        generated = diag <= k - 1
        assert torch.equal(p.guessed, ~generated[p.queries])
        fed += p.queries[~p.guessed].tolist()
        j = torch.arange(n)
        for q, row in zip(p.queries.tolist(), p.visible, strict=True):
            allowed = (j <= q) & (generated | (j == q))
            assert torch.equal(row, allowed), (k, q)  # never a position not generated yet
        sampled += p.targets.tolist()
    assert sorted(sampled) == list(range(n))  # every token once
    assert sorted(fed) == list(range(n - 1))  # every token but the last reaches the cache
    if rows == 1 or cols == 1:
        assert not any(p.guessed.any() for p in passes)


def test_the_540_layout_takes_47_passes_a_frame() -> None:
    grid = PRESETS["wham-1.6b"].tokenizer.grid
    assert grid == (18, 30) and 1 + len(plan_passes(grid, device="cpu")) == 47


def test_decoding_is_checked() -> None:
    model = random_model("tiny")
    with pytest.raises(InputError, match="decoding: expected one of sequential, diagonal"):
        prepare_rollout(model, **_inputs(model, batch=1, context=1, steps=1, mode="full"),
                        decoding="zigzag")


def test_sampling_many_positions_draws_what_each_draws_alone() -> None:
    ranges = [tuple(r) for r in step_token_ranges(image_vocab_size=50,
                                                  tokens_per_image=9).tolist()]
    seeds = torch.tensor([3, 2**40, -7])
    logits = torch.randn(3, 4, 118, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([2, 4, 5, 8])
    for params in (WARM, SamplingParams(top_k=5, top_p=0.8), GREEDY):
        many = Sampler(params, ranges=ranges, tokens_per_image=9, seeds=seeds, vocab_size=118)
        alone = Sampler(params, ranges=ranges, tokens_per_image=9, seeds=seeds, vocab_size=118)
        got = many.sample_many(logits, step=3, positions=positions, first=2)
        want = torch.stack([alone.sample(logits[:, i], step=3, position=j)
                            for i, j in enumerate(positions.tolist())], dim=1)
        assert torch.equal(got, want)
        a, b = many.take_stats(), alone.take_stats()
        for key in ("image_logprob", "image_entropy"):
            torch.testing.assert_close(a[key], b[key])


# ---- against naive_rollout: a plain full-sequence forward per pass under an explicit mask ----


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (2, 2)])
@pytest.mark.parametrize("mode", ["world_model", "full"])
@pytest.mark.parametrize("decoding", DIAGONAL)
def test_engine_equals_naive_rollout_and_never_reads_ungenerated_keys(grid, mode, decoding):
    model = random_model("tiny", seed=1) if grid == (4, 4) else _vit_model(grid, seed=1)
    kw = _inputs(model, batch=2, context=8, steps=3, mode=mode)  # fills, then slides
    r = prepare_rollout(model, **kw, sampling=WARM, decoding=decoding)
    want = naive_rollout(model, r)
    for path in PATHS:
        engine = RolloutEngine(model, max_batch=2, decode=path)
        with torch.no_grad():  # whatever is left in the cache must never be read
            engine.cache.k.normal_(generator=torch.Generator().manual_seed(9))
            engine.cache.v.normal_(generator=torch.Generator().manual_seed(8))
        for a, b in zip(engine.generate(r), want, strict=True):
            assert torch.equal(a.image_tokens, b.image_tokens), path
            assert torch.equal(a.actions, b.actions), path
            # the statistics are functions of the logits: a key seen that should not be moves
            # them even where the sampled tokens stay the same
            for key in ("image_logprob", "image_entropy", "action_logprob", "action_entropy"):
                torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-5,
                                           atol=1e-6, equal_nan=True)


# ---- against sequential decoding and across batches and paths ------------------------------


@pytest.mark.parametrize("grid", [(1, 6), (6, 1)])
@pytest.mark.parametrize("mode", ["world_model", "full"])
@pytest.mark.parametrize("decoding", DIAGONAL)
def test_one_row_or_one_column_gives_exactly_the_sequential_tokens(grid, mode, decoding):
    model = _vit_model(grid)
    kw = _inputs(model, batch=2, context=3, steps=3, mode=mode)
    engine = RolloutEngine(model, max_batch=2)
    for sampling in (GREEDY, WARM):
        sequential = list(engine.rollout(**kw, sampling=sampling))
        diagonal = list(engine.rollout(**kw, sampling=sampling, decoding=decoding))
        for a, b in zip(sequential, diagonal, strict=True):
            assert torch.equal(a.image_tokens, b.image_tokens)
            assert torch.equal(a.actions, b.actions)
            torch.testing.assert_close(a.image_logprob, b.image_logprob)
    assert len(engine.passes) == max(grid) - 1


@pytest.mark.parametrize("decoding", DIAGONAL)
def test_a_rollouts_tokens_do_not_depend_on_its_batch(model, decoding) -> None:
    kw = _inputs(model, batch=3, context=3, steps=2, mode="full", seed=5)
    engine = RolloutEngine(model, max_batch=4)
    together = list(engine.rollout(**kw, sampling=WARM, decoding=decoding))
    for b in range(3):
        single = {**kw, "context_images": kw["context_images"][b:b + 1],
                  "context_actions": kw["context_actions"][b:b + 1], "seeds": [kw["seeds"][b]]}
        alone = list(engine.rollout(**single, sampling=WARM, decoding=decoding))
        for x, y in zip(together, alone, strict=True):
            assert torch.equal(x.image_tokens[b], y.image_tokens[0])
            assert torch.equal(x.actions[b], y.actions[0])
            torch.testing.assert_close(x.image_logprob[b], y.image_logprob[0])


@pytest.mark.parametrize("decoding", DIAGONAL)
def test_eager_static_and_flash_paths_agree_under_diagonal_decoding(model, decoding) -> None:
    kw = _inputs(model, batch=2, context=8, steps=3, mode="full", seed=2)
    runs = {path: list(RolloutEngine(model, max_batch=2, decode=path).rollout(
        **kw, sampling=WARM, decoding=decoding)) for path in PATHS}
    for path in PATHS[1:]:
        for a, b in zip(runs["eager"], runs[path], strict=True):
            assert torch.equal(a.image_tokens, b.image_tokens), path
            assert torch.equal(a.actions, b.actions), path
            torch.testing.assert_close(a.image_entropy, b.image_entropy)


def test_diagonal_decoding_differs_from_sequential_on_a_grid(model) -> None:
    """The passes really run in parallel: on a 4 x 4 grid a warm rollout's tokens change."""
    kw = _inputs(model, batch=2, context=2, steps=2, mode="world_model", seed=3)
    engine = RolloutEngine(model, max_batch=2)
    sequential = list(engine.rollout(**kw, sampling=WARM))
    diagonal = list(engine.rollout(**kw, sampling=WARM, decoding="diagonal"))
    assert any(not torch.equal(a.image_tokens, b.image_tokens)
               for a, b in zip(sequential, diagonal, strict=True))
    assert torch.equal(sequential[0].image_tokens[:, 0], diagonal[0].image_tokens[:, 0])


def test_policy_mode_refuses_diagonal_decoding(model) -> None:
    kw = _inputs(model, batch=1, context=1, steps=1, mode="policy")
    with pytest.raises(InputError, match="policy mode generates none"):
        prepare_rollout(model, **kw, decoding="diagonal")


# ---- checked diagonal decoding -------------------------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, WARM], ids=["greedy", "warm"])
def test_checked_rows_start_with_the_draw_of_their_true_predecessor(model, sampling) -> None:
    """Each row's first token is the one the row above's last token gives once the frame is
    complete (a plain forward over the finished frame under the diagonal mask). Plain diagonal
    decoding's differ on this model when greedy; a frame costs more passes exactly when a
    token changed, and never more than sequential decoding's."""
    rows, cols = model.token_grid
    kw = _inputs(model, batch=3, context=2, steps=1, mode="world_model", seed=6)
    checked, plain = RolloutEngine(model, max_batch=3), RolloutEngine(model, max_batch=3)
    r = prepare_rollout(model, **kw, sampling=sampling, decoding="diagonal-checked")
    [out] = checked.generate(r)
    [ref] = plain.rollout(**kw, sampling=sampling, decoding="diagonal")
    seq = History(r.history).window(model.seq_len)[1]
    x = torch.cat([seq, out.image_tokens], dim=1)
    diag = diagonals(model.token_grid)
    with torch.no_grad():
        logits = model.gpt(x, mask=_mask(x.shape[1], [(seq.shape[1], diag)], diag))
    sampler = Sampler(sampling, ranges=checked.ranges, tokens_per_image=rows * cols,
                      seeds=r.seeds, vocab_size=model.gpt.config.vocab_size)
    for row in range(1, rows):
        t = row * cols
        want = sampler.sample(logits[:, seq.shape[1] + t - 1], step=0, position=t)
        assert torch.equal(out.image_tokens[:, t], want), row
    assert torch.equal(out.image_tokens[:, :cols], ref.image_tokens[:, :cols])  # row 0 alike
    changed = not torch.equal(out.image_tokens, ref.image_tokens)
    assert changed or sampling is not GREEDY  # greedy: this model's guesses mislead it
    assert plain.diagonal_passes == rows + cols - 2
    assert (checked.diagonal_passes > plain.diagonal_passes) == changed
    assert checked.diagonal_passes <= rows * cols - 1  # never more than sequential


def test_the_plan_checks_each_rows_first_token_once_its_predecessor_is_fed() -> None:
    for grid in [(4, 4), (3, 5), (18, 30)]:
        rows, cols = grid
        diag = diagonals(grid)
        passes = plan_passes(grid, device="cpu")
        checks = [(k, p) for k, p in enumerate(passes, start=1) if p.check >= 0]
        assert [p.check_target for _, p in checks] == [r * cols for r in range(1, rows)]
        for k, p in checks:
            before = p.check_target - 1  # the row above's last token, fed with its diagonal
            assert int(p.queries[p.check]) == before and not bool(p.guessed[p.check])
            assert bool(p.visible[p.check, :before + 1].all())  # its whole raster prefix
            # sampled by pass number diag = passes[diag - 1]; decoding goes back to the next
            assert int(diag[p.check_target]) == p.rewind < k
            assert int(passes[p.rewind - 1].targets[-1]) == p.check_target
    assert all(p.check < 0 for p in plan_passes((1, 6), device="cpu"))
    assert all(p.check < 0 for p in plan_passes((6, 1), device="cpu"))
