"""Token sampling: temperature, top-k/top-p, per-position valid ranges, per-rollout noise,
and the quality statistics of what was sampled.

Sampling is Gumbel-max: `argmax(logits / T + g)` with `g = -log(-log(u))` draws exactly from
`softmax(logits / T)`. The uniform `u` is not taken from a stateful generator: it is a hash
of (rollout seed, token counter, vocabulary index) computed with int64 tensor ops on the
device. So a rollout's samples depend only on its own seed and inputs, never on which other
rollouts share the batch, and the per-token step needs no host sync and no per-row loop.

A position only takes tokens from its own range, so the sampler works on the slice
`logits[:, lo:hi + 1]`: no mask, and noise only for that slice. Everything that does not
depend on the token (ranges, the hashed vocabulary indices) is built once per `Sampler`.

Quality statistics are taken on the model's own distribution at temperature 1 restricted to
the position's valid range, whatever the sampling settings: the log-probability of the token
drawn, `s[tok] - logsumexp(s)`, and the entropy `logsumexp(s) - sum(softmax(s) * s)`, summed
per row on the device and averaged per step (`Sampler.take_stats`).
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


_MASK64 = (1 << 64) - 1


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: a bijective scramble of 64-bit integers."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _mix64_int(z: int) -> int:
    """`_mix64` on a Python int (same bits), for values known on the host."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * (_MIX1 & _MASK64)) & _MASK64
    z = ((z ^ (z >> 27)) * (_MIX2 & _MASK64)) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >> 63 else z


def vocab_hash(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """The per-vocabulary-index term of the noise hash, [V] int64 (build once, slice per use)."""
    return torch.arange(1, vocab_size + 1, device=device, dtype=torch.long) * _GOLDEN


def _counter_key(counter: int | torch.Tensor) -> int | torch.Tensor:
    """The hash of a token counter: a Python int for one counter known on the host, or int64
    [P] on the device for a tensor of counters (the same bits either way)."""
    if isinstance(counter, torch.Tensor):
        return _mix64(counter * _GOLDEN + 1)
    return _mix64_int(counter * (_GOLDEN & _MASK64) + 1)


def uniform_noise(seeds: torch.Tensor, counter: int | torch.Tensor,
                  hashed: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1): a pure function of (seed, counter, vocabulary index) for the indices
    whose `vocab_hash` entries are ``hashed`` [W]. [B, W] for one counter, [B, P, W] for a
    tensor of P counters (each position's noise the same as drawn alone)."""
    key = _counter_key(counter)
    row = _mix64(seeds ^ key if isinstance(key, int) else seeds[:, None] ^ key)  # [B] | [B, P]
    bits = _mix64(row[..., None] + hashed)  # [B, (P,) W]
    return (_shr(bits, 40).float() + 0.5) * (1.0 / (1 << 24))  # top 24 bits -> float32


def _filter(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Top-k then top-p on [B, (P,) W] scores (dropped tokens get -inf)."""
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[..., -1:]  # [B, (P,) 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative > params.top_p
        drop[..., 0] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def draw(
    logits: torch.Tensor, *, params: SamplingParams, lo: int, hi: int, seeds: torch.Tensor,
    counter: int | torch.Tensor, hashed: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V] -> tokens [B] drawn within [lo, hi] (inclusive), or [B, P, V] -> [B, P]
    with a counter [P] per position; ``hashed`` is `vocab_hash` of the whole vocabulary."""
    scores = logits[..., lo:hi + 1].float() / params.effective_temperature  # [B, (P,) W]
    if not params.greedy:
        scores = _filter(scores, params)
        u = uniform_noise(seeds, counter, hashed[lo:hi + 1])
        scores = scores - torch.log(-torch.log(u))
    return scores.argmax(dim=-1) + lo


def sample_tokens(
    logits: torch.Tensor, *, params: SamplingParams, lo: int, hi: int, seeds: torch.Tensor,
    counter: int,
) -> torch.Tensor:
    """One draw without a Sampler (tests, one-off use): logits [B, V] -> tokens [B]."""
    hashed = vocab_hash(logits.shape[-1], logits.device)
    return draw(logits, params=params, lo=lo, hi=hi, seeds=seeds, counter=counter,
                hashed=hashed)


def _token_stats(logits: torch.Tensor, tokens: torch.Tensor, *, lo: int,
                 hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, P, V], tokens [B, P] drawn within [lo, hi] -> each token's log-probability
    and the entropy of its distribution [B, P], at temperature 1 over the valid range."""
    s = logits[..., lo:hi + 1].float()
    lse = torch.logsumexp(s, dim=-1)
    logprob = s.gather(-1, (tokens - lo)[..., None])[..., 0] - lse
    return logprob, lse - (s.softmax(dim=-1) * s).sum(dim=-1)


class Sampler:
    """Draws the tokens of one rollout and keeps per-step quality statistics.

    ranges: inclusive (lo, hi) of every position of a step; positions below
    ``tokens_per_image`` are image tokens, the rest action tokens. The token counter of
    position j in generated step i is ``i * len(ranges) + j``.
    """

    def __init__(
        self, params: SamplingParams, *, ranges: list[tuple[int, int]], tokens_per_image: int,
        seeds: torch.Tensor, vocab_size: int, stats: bool = True,
    ) -> None:
        self.params = params
        self.ranges = ranges
        self.tokens_per_image = tokens_per_image
        self.seeds = seeds
        self.stats = stats
        self.hashed = vocab_hash(vocab_size, seeds.device)
        batch = seeds.shape[0]
        # [B, 2] sums for (image, action) positions, and how many of each were sampled
        self._logprob = torch.zeros(batch, 2, device=seeds.device)
        self._entropy = torch.zeros(batch, 2, device=seeds.device)
        self._counts = [0, 0]

    def sample(self, logits: torch.Tensor, *, step: int, position: int) -> torch.Tensor:
        """logits [B, V] of the token before `position` -> tokens [B]."""
        lo, hi = self.ranges[position]
        counter = step * len(self.ranges) + position
        tokens = draw(logits, params=self.params, lo=lo, hi=hi, seeds=self.seeds,
                      counter=counter, hashed=self.hashed)
        if self.stats:
            self.add_stats(*_token_stats(logits[:, None], tokens[:, None], lo=lo, hi=hi),
                           kind=int(position >= self.tokens_per_image))
        return tokens

    def sample_many(self, logits: torch.Tensor, *, step: int, positions: torch.Tensor,
                    first: int) -> torch.Tensor:
        """logits [B, P, V], each row that of the token before `positions` [P] -> tokens
        [B, P], each drawn as `sample` would draw it alone. The positions share one valid
        range, that of `first` (one of them, known on the host)."""
        tokens, stats = self.draw_many(logits, step=step, positions=positions, first=first)
        if stats is not None:
            self.add_stats(*stats, kind=int(first >= self.tokens_per_image))
        return tokens

    def draw_many(self, logits: torch.Tensor, *, step: int, positions: torch.Tensor,
                  first: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """`sample_many` without keeping the statistics: tokens [B, P] and, when statistics
        are on, each token's (log-probability, entropy) [B, P], for `add_stats` once the
        caller knows which draws stand (a draw made again replaces the first)."""
        lo, hi = self.ranges[first]
        counters = step * len(self.ranges) + positions  # [P]
        tokens = draw(logits, params=self.params, lo=lo, hi=hi, seeds=self.seeds,
                      counter=counters, hashed=self.hashed)
        if not self.stats:
            return tokens, None
        return tokens, _token_stats(logits, tokens, lo=lo, hi=hi)

    def add_stats(self, logprob: torch.Tensor, entropy: torch.Tensor, *, kind: int) -> None:
        """Keep the statistics [B, P] of P drawn tokens (kind 0: image, 1: action)."""
        self._logprob[:, kind] += logprob.sum(dim=1)
        self._entropy[:, kind] += entropy.sum(dim=1)
        self._counts[kind] += logprob.shape[1]

    def take_stats(self) -> dict[str, torch.Tensor]:
        """Per-row means since the last call, [B] float32 on the CPU (NaN where nothing of that
        kind was sampled), and start again."""
        counts = torch.tensor(self._counts, dtype=torch.float32)
        counts[counts == 0] = float("nan")
        logprob = self._logprob.cpu() / counts
        entropy = self._entropy.cpu() / counts
        self._logprob.zero_()
        self._entropy.zero_()
        self._counts = [0, 0]
        return {"image_logprob": logprob[:, 0], "image_entropy": entropy[:, 0],
                "action_logprob": logprob[:, 1], "action_entropy": entropy[:, 1]}
