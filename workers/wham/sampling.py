"""Token sampling: temperature, top-k/top-p, per-position valid ranges, per-rollout noise.

Sampling is Gumbel-max: `argmax(logits / T + g)` with `g = -log(-log(u))` draws exactly from
`softmax(logits / T)`. The uniform `u` is not taken from a stateful generator: it is a hash
of (rollout seed, token counter, vocabulary index) computed with int64 tensor ops on the
device. So a rollout's samples depend only on its own seed and inputs, never on which other
rollouts share the batch, and the per-token step needs no host sync and no per-row loop.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from workers.wham.actions import action_token_ranges
from workers.wham.errors import InputError

MIN_TEMPERATURE = 0.1  # the reference clamps lower temperatures to this

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; products wrap).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. Defaults are the official server's.

    temperature is clamped to at least 0.1 like the reference; greedy takes the arg-max
    (the reference's deterministic mode, i.e. top-k 1). top_p keeps the most probable tokens
    whose cumulative probability does not exceed top_p (the first always stays), as the
    reference does; top_k and top_p may be combined (top-k first).
    """

    temperature: float = 0.9
    top_k: int | None = None
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InputError(f"top_k must be None or an integer >= 1, got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def effective_temperature(self) -> float:
        return max(float(self.temperature), MIN_TEMPERATURE)


def step_token_ranges(*, image_vocab_size: int, tokens_per_image: int) -> torch.Tensor:
    """Inclusive [lo, hi] of every position of a step: LongTensor [tokens_per_step, 2].

    Image positions may take [0, V_img) except the first image token of a frame, which the
    reference restricts to [1, V_img); action position j only takes its own range.
    """
    image = torch.tensor([[0, image_vocab_size - 1]], dtype=torch.long).repeat(tokens_per_image, 1)
    image[0, 0] = 1
    actions = torch.from_numpy(action_token_ranges(image_vocab_size)).long()
    return torch.cat([image, actions])


def seeds_to_tensor(seeds, *, batch: int, device: torch.device) -> torch.Tensor:
    """list[int] of length batch -> int64 tensor (values reduced modulo 2**64)."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    try:
        seeds = list(seeds)
    except TypeError:
        raise InputError(f"seeds: expected a list of {batch} integers, got {seeds!r}") from None
    if len(seeds) != batch:
        raise InputError(f"seeds: expected {batch} seeds (one per rollout), got {len(seeds)}")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise InputError(f"seeds[{i}]: expected an integer, got {s!r}")
    wrapped = [((int(s) + (1 << 63)) % (1 << 64)) - (1 << 63) for s in seeds]
    return torch.tensor(wrapped, dtype=torch.long, device=device)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: a bijective scramble of 64-bit integers."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniform_noise(
    seeds: torch.Tensor, counter: int | torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Uniforms in (0, 1) for [B, V], a pure function of (seed, counter, vocab index)."""
    row = _mix64(seeds ^ _mix64(torch.as_tensor(counter, device=seeds.device) * _GOLDEN + 1))
    vocab = torch.arange(1, vocab_size + 1, device=seeds.device, dtype=torch.long)
    bits = _mix64(row[:, None] + vocab[None, :] * _GOLDEN)  # [B, V]
    return (_shr(bits, 40).float() + 0.5) * (1.0 / (1 << 24))  # top 24 bits -> float32


def sample_tokens(
    logits: torch.Tensor,
    *,
    params: SamplingParams,
    lo: torch.Tensor,
    hi: torch.Tensor,
    seeds: torch.Tensor,
    counter: int | torch.Tensor,
) -> torch.Tensor:
    """logits [B, V] -> tokens [B] drawn within [lo, hi] (inclusive, 0-d tensors)."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    valid = (vocab >= lo) & (vocab <= hi)  # [V]
    scores = (logits.float() / params.effective_temperature).masked_fill(~valid, float("-inf"))
    if params.greedy:
        return scores.argmax(dim=-1)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative > params.top_p
        drop[:, 0] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, counter, logits.shape[-1])))
    return (scores + gumbel).argmax(dim=-1)
