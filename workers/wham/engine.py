"""Batched autoregressive rollouts with a static KV cache.

The loop reads like gpt-fast: validate once (`prepare_rollout` -> `Rollout`), then per step
one `prefill` (the whole window after a slide, else only the tokens the cache has not seen,
plus the given frame in policy mode) and `decode_n_tokens` over the step's generated
positions. Positions are absolute, so when the window slides every cached key/value is stale
and the window is prefilled again (`CacheWindow` says from where to feed). Nothing in the
per-token loop reads tensor values on the host or rebuilds what a rollout could build once.

With `decoding="diagonal"` a frame's image tokens are sampled one anti-diagonal of the token
grid per forward pass (`decode_diagonals`, see `workers.wham.diagonal`); the prefill, the
window and the action tokens stay as they are. `"diagonal-checked"` also draws each row's
first token again from its true predecessor and runs the passes after it again where that
changes a token (`diagonal_passes` counts the passes run).

`Decoder` (the cache rows of one batch and the per-token step) and `decode_n_tokens` are the
public step API that the rollout loop and the benchmarks share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from workers.wham.diagonal import DiagonalPass, plan_passes
from workers.wham.errors import InputError
from workers.wham.gpt import GPT, KVCache, flash_available, flash_installed
from workers.wham.linear import packed_view
from workers.wham.model import WHAMModel
from workers.wham.resources import kv_cache_bytes
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

DECODE_PATHS = ("auto", "eager", "static", "flash")


class StaticDecode(nn.Module):
    """One-token decode over the whole preallocated cache, with the cache held as buffers so
    that a compiled CUDA graph may update it in place (token [B, 1], pos [1] -> [B, V])."""

    def __init__(self, gpt: GPT, cache: KVCache) -> None:
        super().__init__()
        self.gpt = gpt
        self.register_buffer("k", cache.k, persistent=False)
        self.register_buffer("v", cache.v, persistent=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, use_flash: bool = False):
        b = token.shape[0]
        return self.gpt.decode_step(token, k_cache=self.k[:, :b], v_cache=self.v[:, :b],
                                    pos=pos, use_flash=use_flash)


@dataclass
class CacheWindow:
    """What the KV cache holds: the window starting at absolute history step `first`, laid out
    from position 0, and its first `filled` tokens; how often it was fed from position 0 (a
    new window) and appended to (the tokens the cache had not seen)."""

    first: int = -1
    filled: int = 0
    prefills: int = 0
    extends: int = 0

    def start(self, first: int) -> int:
        """Position from which to feed a window that starts at history step `first` (0 when
        the window slid: every cached position is stale)."""
        if first != self.first:
            self.first, self.filled = first, 0
        self.prefills += self.filled == 0
        self.extends += self.filled > 0
        return self.filled


class Decoder:
    """The first `batch` rows of an engine's cache and its per-token step."""

    def __init__(self, engine: RolloutEngine, batch: int) -> None:
        self.gpt = engine.gpt
        self.k, self.v = engine.cache.rows(batch)
        self._engine = engine
        self._fixed = engine.decode_path != "eager"

    def prefill(self, tokens: torch.Tensor, *, start: int) -> torch.Tensor:
        """Feed tokens [B, L] at positions start.. (a whole window or an unseen tail) -> the
        last token's logits [B, V]."""
        return self.gpt.forward_cached(tokens, k_cache=self.k, v_cache=self.v, start=start)

    def decode_one_token(self, token: torch.Tensor, *, pos: int) -> torch.Tensor:
        """token [B] at position pos -> logits [B, V]."""
        if not self._fixed:
            return self.gpt.forward_cached(token[:, None], k_cache=self.k, v_cache=self.v,
                                           start=pos)
        engine = self._engine
        engine.pos.fill_(pos)  # a device-side write, not a host sync
        return engine.static_decode(token[:, None], engine.pos,
                                    use_flash=engine.decode_path == "flash")

    def forward_at(self, tokens: torch.Tensor, *, positions: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, P] at positions [P], attending under mask [P, L] to the first L cached
        positions -> logits [B, P, V]."""
        return self.gpt.forward_at(tokens, k_cache=self.k, v_cache=self.v, positions=positions,
                                   mask=mask)

    def mask_length(self, end: int) -> int:
        """Cache positions a multi-token pass attends over when its queries end before `end`:
        that far on the eager path; the whole cache on the fixed-shape paths (flash-attn has
        no arbitrary mask, so its path takes the static one for these passes)."""
        return self.k.shape[3] if self._fixed else end


def decode_n_tokens(
    decoder: Decoder,
    logits: torch.Tensor,
    *,
    positions: range,
    start_pos: int,
    sample: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """Sample one token per step position in `positions`, feeding each but the last.
    logits [B, V] are those of the token before the first position -> tokens [B, P]."""
    out = []
    for i, j in enumerate(positions):
        token = sample(logits, j)  # [B]
        out.append(token)
        if i + 1 < len(positions):
            logits = decoder.decode_one_token(token, pos=start_pos + i)
    return torch.stack(out, dim=1)


def decode_diagonals(
    decoder: Decoder,
    logits: torch.Tensor,
    *,
    passes: list[DiagonalPass],
    start_pos: int,
    previous: torch.Tensor,
    sampler: Sampler,
    step: int,
    checked: bool = False,
) -> tuple[torch.Tensor, int]:
    """Sample a frame's image tokens one diagonal per pass. logits [B, V] are those of the
    token before the frame, which starts at cache position start_pos; previous [B, n] is the
    frame before it (the guesses for predecessors not generated yet). checked: draw each row's
    first token again from its true predecessor and go back where a draw changes (see
    `workers.wham.diagonal`) -> (tokens [B, n], the passes run after the first token)."""
    image = torch.zeros_like(previous)  # [B, n]
    image[:, 0] = sampler.sample(logits, step=step, position=0)
    stats = [torch.zeros(previous.shape, device=previous.device) for _ in range(2)] \
        if sampler.stats else None  # each token's (logprob, entropy) [B, n], once it stands
    k, run = 0, 0
    while k < len(passes):
        p = passes[k]
        feed = torch.where(p.guessed, previous[:, p.queries], image[:, p.queries])  # [B, P]
        mask = p.cache_mask(start=start_pos, length=decoder.mask_length(start_pos + p.span))
        out = decoder.forward_at(feed, positions=p.queries + start_pos, mask=mask)  # [B, P, V]
        _put(image, stats, *sampler.draw_many(out[:, p.source], step=step, positions=p.targets,
                                              first=p.first), at=p.targets)
        k, run = k + 1, run + 1
        if not checked or p.check < 0:
            continue
        at = p.targets.new_tensor([p.check_target])
        before = image[:, p.check_target].clone()
        _put(image, stats, *sampler.draw_many(out[:, p.check, None], step=step, positions=at,
                                              first=p.check_target), at=at)
        if bool((image[:, p.check_target] != before).any()):  # one host sync per checked pass
            k = p.rewind  # run again every pass after the one that sampled it
    if stats is not None:
        sampler.add_stats(stats[0][:, 1:], stats[1][:, 1:], kind=0)
    return image, run


def _put(image: torch.Tensor, stats: list[torch.Tensor] | None, tokens: torch.Tensor,
         drawn: tuple[torch.Tensor, torch.Tensor] | None, *, at: torch.Tensor) -> None:
    """Write draws: tokens [B, P] and their statistics at frame positions `at` [P]."""
    image[:, at] = tokens
    if stats is not None and drawn is not None:
        stats[0][:, at], stats[1][:, at] = drawn


def _decode_path(requested: str, *, device: torch.device, dtype: torch.dtype,
                 compile: bool) -> str:
    if requested not in DECODE_PATHS:
        raise InputError(f"decode: expected one of {', '.join(DECODE_PATHS)}, got {requested!r}")
    if requested == "auto":
        if flash_available(device, dtype):
            return "flash"
        return "static" if compile and device.type == "cuda" else "eager"
    if requested == "flash" and not flash_installed():
        raise InputError("decode='flash' needs flash-attn installed (pip install flash-attn)")
    return requested


class RolloutEngine:
    """Runs B <= max_batch rollouts in lockstep on one model; the KV cache is allocated once.

    decode: "auto" (flash-attn's KV-cache kernel on CUDA in half precision when installed,
    else the static path when compiling on CUDA, else eager), or "eager" (attention over the
    filled part of the cache), "static" (fixed shapes: the whole cache, masked) or "flash".
    compile: on CUDA, compile the static decode step into a CUDA graph. prepack (default: on
    the CPU) runs the transformer through `packed_view`: the engine's own copy of the module
    structure over the same weight tensors, whose matmuls use oneDNN-packed weights (memory
    the size of the weights); the model passed in is left unchanged.

    `window` describes what the cache holds and belongs to the rollout that stepped last: a
    rollout whose window is no longer the engine's refuses to go on.
    """

    def __init__(self, model: WHAMModel, *, max_batch: int, compile: bool = False,
                 decode: str = "auto", prepack: bool | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        self.model = model
        self.max_batch = max_batch
        self.device = torch.device(model.device)
        if prepack is None:
            prepack = self.device.type == "cpu"
        packed = packed_view(model.gpt) if prepack else None
        self.gpt: GPT = model.gpt if packed is None else packed
        cfg = self.gpt.config
        self.cache = KVCache(cfg, batch=max_batch, max_seq=cfg.block_size, device=self.device,
                             dtype=model.dtype)
        ranges = step_token_ranges(image_vocab_size=model.image_vocab_size,
                                   tokens_per_image=model.tokens_per_image)
        self.ranges: list[tuple[int, int]] = [tuple(r) for r in ranges.tolist()]
        self.decode_path = _decode_path(decode, device=self.device, dtype=model.dtype,
                                        compile=compile)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.static_decode = StaticDecode(self.gpt, self.cache)
        if compile and self.device.type == "cuda" and self.decode_path == "static":
            self.static_decode = torch.compile(self.static_decode, mode="reduce-overhead")
        self.passes = plan_passes(model.token_grid, device=self.device)
        self.diagonal_passes = 0  # passes diagonal decoding has run, each frame's first aside
        self.window = CacheWindow()

    kv_cache_bytes = staticmethod(kv_cache_bytes)

    def decoder(self, batch: int) -> Decoder:
        """The public step API over the first `batch` rows of the cache."""
        return Decoder(self, batch)

    def sampler(self, r: Rollout, *, stats: bool = True) -> Sampler:
        return Sampler(r.sampling, ranges=self.ranges, tokens_per_image=self.model.tokens_per_image,
                       seeds=r.seeds, vocab_size=self.gpt.config.vocab_size, stats=stats)

    def rollout(self, **inputs) -> Iterator[StepOutput]:
        """Check the inputs now (see `prepare_rollout` for the keywords), and return an
        iterator that yields one StepOutput per generated step as it is advanced."""
        return self.generate(prepare_rollout(self.model, max_batch=self.max_batch, **inputs))

    def generate(self, r: Rollout) -> Iterator[StepOutput]:
        """Yield one StepOutput per generated step of a prepared rollout."""
        if r.batch > self.max_batch:
            raise InputError(f"rollout batch {r.batch} > max_batch={self.max_batch}")
        self.window = window = CacheWindow()  # the cache is this rollout's from now on
        decoder, sampler = self.decoder(r.batch), self.sampler(r)
        history = History(r.history)
        n, seq_len = self.model.tokens_per_image, self.model.seq_len
        positions = generated_positions(r.mode, n, self.model.tokens_per_step)
        for index in range(r.steps):
            if self.window is not window:
                raise RuntimeError("another rollout ran on this engine's cache meanwhile; "
                                   "finish one rollout before advancing the next")
            with torch.no_grad():
                previous = history.tokens[:, -1, :n]  # [B, n] the frame before this step
                first, tokens = history.window(seq_len)  # [B, W * tps]
                start = window.start(first)
                feed = tokens[:, start:]
                if r.mode == "policy":
                    feed = torch.cat([feed, r.observations[:, index]], dim=1)
                logits = decoder.prefill(feed, start=start)
                start_pos = start + feed.shape[1]
                generated = self._decode_step(r, decoder, logits, sampler=sampler, index=index,
                                              start_pos=start_pos, previous=previous)
                # Every generated token but the last was fed; the last one goes in with the
                # next step's tail (or window), so the cache holds one position fewer.
                window.filled = start_pos + len(positions) - 1
                step = complete_step(r, index=index, generated=generated, n=n)
                out = step_output(self.model, r, index=index, step=step, previous=previous,
                                  stats=sampler.take_stats())
                history.append(step, max_context=r.max_context)
            yield out

    def _decode_step(self, r: Rollout, decoder: Decoder, logits: torch.Tensor, *,
                     sampler: Sampler, index: int, start_pos: int,
                     previous: torch.Tensor) -> torch.Tensor:
        """The tokens [B, P] of the step's generated positions (see generated_positions), the
        first of them at cache position start_pos; previous [B, n] is the frame before."""
        n, tps = self.model.tokens_per_image, self.model.tokens_per_step
        positions = generated_positions(r.mode, n, tps)

        def sample(lg: torch.Tensor, j: int) -> torch.Tensor:
            return sampler.sample(lg, step=index, position=j)

        if r.decoding == "sequential" or r.mode == "policy":  # policy samples no image
            return decode_n_tokens(decoder, logits, positions=positions, start_pos=start_pos,
                                   sample=sample)
        image, run = decode_diagonals(decoder, logits, passes=self.passes, start_pos=start_pos,
                                      previous=previous, sampler=sampler, step=index,
                                      checked=r.decoding == "diagonal-checked")
        self.diagonal_passes += run
        if r.mode == "world_model":
            return image
        logits = decoder.decode_one_token(image[:, -1], pos=start_pos + n - 1)
        actions = decode_n_tokens(decoder, logits, positions=range(n, tps),
                                  start_pos=start_pos + n, sample=sample)
        return torch.cat([image, actions], dim=1)
