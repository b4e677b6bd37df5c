"""The slow, obviously correct rollout: every sampled token (or, with diagonal decoding, every
pass) recomputes the whole window from position 0 with `GPT.forward`. Same `Rollout`, window
rule, sampler and step bookkeeping as the engine; tests check the engine against it and the
benchmarks time it.

Diagonal decoding (see `workers.wham.diagonal`) is spelled out with an explicit attention
mask instead of a plan of passes: inside a frame generated diagonally, a token sees the frame
positions at or before it whose diagonal is at most its own, and itself; a position fed a
guess (the previous frame's token, because its own is not generated yet) sees the diagonals
generated so far. Such a frame keeps that visibility for later steps until the window slides:
a slid window is fed again from position 0, causally, in the engine as here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from workers.wham.diagonal import diagonals, sees
from workers.wham.model import WHAMModel
from workers.wham.rollout import (
    History,
    Rollout,
    StepOutput,
    complete_step,
    generated_positions,
    prepare_rollout,
    step_output,
)
from workers.wham.sampling import Sampler, step_token_ranges

Forward = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _mask(length: int, frames: list[tuple[int, torch.Tensor]],
          diag: torch.Tensor) -> torch.Tensor | None:
    """[L, L] attention mask: causal, except inside each frame (offset, bound [n]) generated
    diagonally, where position i sees positions j <= i with diag[j] <= bound[i], and itself.
    None (plain causal) when there is no such frame."""
    if not frames:
        return None
    mask = torch.ones(length, length, dtype=torch.bool, device=diag.device).tril()
    j = torch.arange(diag.numel(), device=diag.device)
    for offset, bound in frames:
        size = min(diag.numel(), length - offset)
        block = sees(diag, at=j, bound=bound) | (j[None, :] == j[:, None])  # [n, n]
        mask[offset:offset + size, offset:offset + size] = block[:size, :size]
    return mask


def _diagonal_image(forward: Forward, seq: torch.Tensor, *, previous: torch.Tensor,
                    grid: tuple[int, int], checked: bool, sampler: Sampler,
                    step: int) -> torch.Tensor:
    """A frame's image tokens [B, n], diagonal by diagonal, each token from its predecessor's
    logits; seq [B, S] is what precedes the frame, previous [B, n] the frame before it.
    checked: once row r - 1 is complete (in the pass sampling diagonal r + cols - 1), draw
    row r's first token again from the logits of row r - 1's last token; where it differs for
    any rollout, decode again from diagonal r + 1 on. Draws are made without statistics; each
    token's statistics are taken once, at the end, from the logits it was last drawn from."""
    start, (rows, cols) = seq.shape[1], grid
    diag = diagonals(grid).to(previous.device)
    image = torch.zeros_like(previous)
    source: dict[int, torch.Tensor] = {0: forward(seq, None)[:, -1]}  # position -> logits [B, V]
    image[:, 0] = _draw(sampler, source[0], step=step, position=0)
    k = 1
    while k <= int(diag.max()):
        targets = (diag == k).nonzero().flatten().tolist()
        guessed = [t - 1 for t in targets if diag[t - 1] >= k]  # predecessors not generated
        frame, bound = image.clone(), diag.clone()
        frame[:, guessed], bound[guessed] = previous[:, guessed], k - 1
        logits = forward(torch.cat([seq, frame], dim=1), bound)  # [B, S + n, V]
        for t in targets:
            source[t] = logits[:, start + t - 1]
            image[:, t] = _draw(sampler, source[t], step=step, position=t)
        row, k = k - cols + 1, k + 1
        if checked and cols > 1 and 1 <= row < rows:  # row - 1 is complete: its last token fed
            t = row * cols
            source[t] = logits[:, start + t - 1]
            redrawn = _draw(sampler, source[t], step=step, position=t)
            if not torch.equal(redrawn, image[:, t]):
                image[:, t] = redrawn
                k = row + 1
    for t in range(previous.shape[1]):  # each token's statistics, once
        assert torch.equal(sampler.sample(source[t], step=step, position=t), image[:, t])
    return image


def _draw(sampler: Sampler, logits: torch.Tensor, *, step: int, position: int) -> torch.Tensor:
    """A draw without statistics: logits [B, V] -> tokens [B]."""
    at = torch.tensor([position], device=logits.device)
    return sampler.draw_many(logits[:, None], step=step, positions=at, first=position)[0][:, 0]


def naive_rollout(model: WHAMModel, rollout: Rollout | None = None, /,
                  **inputs) -> list[StepOutput]:
    """All steps of a rollout, given prepared or as `prepare_rollout`'s keywords."""
    r = rollout if rollout is not None else prepare_rollout(model, **inputs)
    n, tps = model.tokens_per_image, model.tokens_per_step
    ranges = step_token_ranges(image_vocab_size=model.image_vocab_size, tokens_per_image=n)
    sampler = Sampler(r.sampling, ranges=[tuple(x) for x in ranges.tolist()],
                      tokens_per_image=n, seeds=r.seeds, vocab_size=model.gpt.config.vocab_size)
    diagonal = r.decoding != "sequential" and r.mode != "policy"
    diag = diagonals(model.token_grid).to(r.seeds.device)
    history, outputs = History(r.history), []
    marked, window_first = [False] * r.history.shape[1], None  # frames generated diagonally
    with torch.no_grad():
        for index in range(r.steps):
            first, seq = history.window(model.seq_len)  # [B, W * tps]
            if first != window_first:  # a new window is fed from position 0, causally
                marked, window_first = [False] * len(marked), first
            shown = marked[len(marked) - seq.shape[1] // tps:]
            frames = [(s * tps, diag) for s, m in enumerate(shown) if m]
            if r.mode == "policy":
                seq = torch.cat([seq, r.observations[:, index]], dim=1)
            start = seq.shape[1]

            def forward(x, bound, frames=frames, start=start):
                current = [] if bound is None else [(start, bound)]
                return model.gpt(x, mask=_mask(x.shape[1], [*frames, *current], diag))

            positions = generated_positions(r.mode, n, tps)
            new: list[torch.Tensor] = []
            if diagonal:
                image = _diagonal_image(forward, seq, previous=history.tokens[:, -1, :n],
                                        grid=model.token_grid, sampler=sampler, step=index,
                                        checked=r.decoding == "diagonal-checked")
                new, positions = list(image.unbind(dim=1)), positions[n:]
            for j in positions:
                x = torch.cat([seq, *[t[:, None] for t in new]], dim=1)
                logits = forward(x, diag if diagonal else None)[:, -1]
                new.append(sampler.sample(logits, step=index, position=j))
            step = complete_step(r, index=index, generated=torch.stack(new, dim=1), n=n)
            outputs.append(step_output(model, r, index=index, step=step,
                                       previous=history.tokens[:, -1, :n],
                                       stats=sampler.take_stats()))
            dropped = history.first
            history.append(step, max_context=r.max_context)
            marked = marked[history.first - dropped:] + [diagonal]
    return outputs
