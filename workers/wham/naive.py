"""The slow, obviously correct rollout: every token recomputes the whole window from position 0
with `GPT.forward`. Same `Rollout`, window rule, sampler and step bookkeeping as the engine;
tests check the engine against it and the benchmarks time it."""

from __future__ import annotations

import torch

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


def naive_rollout(model: WHAMModel, rollout: Rollout | None = None, /,
                  **inputs) -> list[StepOutput]:
    """All steps of a rollout, given prepared or as `prepare_rollout`'s keywords."""
    r = rollout if rollout is not None else prepare_rollout(model, **inputs)
    n, tps = model.tokens_per_image, model.tokens_per_step
    ranges = step_token_ranges(image_vocab_size=model.image_vocab_size, tokens_per_image=n)
    sampler = Sampler(r.sampling, ranges=[tuple(x) for x in ranges.tolist()],
                      tokens_per_image=n, seeds=r.seeds, vocab_size=model.gpt.config.vocab_size)
    history, outputs = History(r.history), []
    with torch.no_grad():
        for index in range(r.steps):
            seq = history.window(model.seq_len)[1]  # [B, W * tps]
            if r.mode == "policy":
                seq = torch.cat([seq, r.observations[:, index]], dim=1)
            new: list[torch.Tensor] = []
            for j in generated_positions(r.mode, n, tps):
                logits = model.gpt(torch.cat([seq, *[t[:, None] for t in new]], dim=1))[:, -1]
                new.append(sampler.sample(logits, step=index, position=j))
            step = complete_step(r, index=index, generated=torch.stack(new, dim=1), n=n)
            outputs.append(step_output(model, r, index=index, step=step,
                                       previous=history.tokens[:, -1, :n],
                                       stats=sampler.take_stats()))
            history.append(step, max_context=r.max_context)
    return outputs
