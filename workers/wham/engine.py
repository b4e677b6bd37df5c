"""Batched autoregressive rollouts with a static KV cache.

B rollouts advance in lockstep. A step is `n` image tokens then 16 action tokens; the window
the model sees follows the reference (see `_window`): at most `seq_len - 1` whole steps,
laid out from position 0. Positions are absolute, so when the window slides every cached
key/value is stale and the window is prefilled again (once per generated step); while the
window still grows the cache is only extended by the tokens it has not seen yet.

Per step: one chunk forward (`prefill`: the whole window after a slide, else the unseen tail
plus, in policy mode, the given frame's tokens), then `decode_n_tokens` samples the step's
generated positions one token at a time. Nothing in the per-token loop reads tensor values
on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from workers.wham.actions import (
    ACTION_DIM,
    ACTION_VOCAB_SIZE,
    action_token_ranges,
    actions_to_tokens,
    validate_actions,
)
from workers.wham.errors import InputError
from workers.wham.gpt import GPT, KVCache, flash_available
from workers.wham.sampling import (
    SamplingParams,
    sample_tokens,
    seeds_to_tensor,
    step_token_ranges,
)

MODES = ("world_model", "policy", "full")


@dataclass
class StepOutput:
    index: int  # 0-based among generated steps
    image_tokens: torch.Tensor  # [B, n] int64, CPU
    images: np.ndarray | None  # [B, 3, H, W] uint8 (None only with decode_images=False)
    actions: torch.Tensor  # [B, 16] int64, CPU, model form (buttons 0/1, stick bins)
    action_source: str  # "model" | "given"


@dataclass
class _Rollout:
    """Validated inputs in token form, on the model's device."""

    history: torch.Tensor  # [B, T, tokens_per_step]
    given_actions: torch.Tensor | None  # [B, steps, 16] action tokens (world_model)
    observations: torch.Tensor | None  # [B, steps, n] image tokens (policy)
    observation_images: np.ndarray | None  # [B, steps, 3, H, W] uint8 (policy)
    seeds: torch.Tensor  # [B] int64
    steps: int
    mode: str
    max_context: int
    action_offsets: torch.Tensor  # [16] first token id of each action position, CPU
    decode_images: bool = True


def image_vocab_size(model) -> int:
    return getattr(model, "image_vocab_size", model.gpt.config.vocab_size - ACTION_VOCAB_SIZE)


def seq_len_steps(model) -> int:
    """Steps the transformer's position table holds (10 for the released models)."""
    return model.gpt.config.block_size // model.tokens_per_step


def _window(history_len: int, seq_len: int) -> int:
    """Index of the first history step the reference feeds: it drops the oldest step when
    the history is full, so a step is predicted from at most seq_len - 1 steps."""
    return 1 if history_len >= seq_len else 0


def _as_uint8_images(x, *, name: str, batch: int, steps: int | None, size) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        kind = getattr(x, "dtype", type(x).__name__)
        raise InputError(f"{name}: expected uint8 images (B, T, 3, H, W), got {kind}")
    h, w = size
    expected_t = "T" if steps is None else steps
    if x.ndim != 5 or x.shape[0] != batch or tuple(x.shape[2:]) != (3, h, w) or (
        steps is not None and x.shape[1] != steps
    ):
        raise InputError(
            f"{name}: expected shape ({batch}, {expected_t}, 3, {h}, {w}) for this model, "
            f"got {tuple(x.shape)}"
        )
    return x


def _action_tokens(x, *, name: str, batch: int, steps: int, v_img: int, device) -> torch.Tensor:
    arr = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 3 or arr.shape[:2] != (batch, steps) or arr.shape[2] != ACTION_DIM:
        raise InputError(
            f"{name}: expected shape ({batch}, {steps}, {ACTION_DIM}), got {tuple(arr.shape)}"
        )
    tokens = actions_to_tokens(validate_actions(arr, name=name), v_img)
    return torch.from_numpy(tokens).to(device)


def _context_tokens(model, *, context_images, context_tokens, max_batch, max_context):
    """Context frames as image tokens [B, T, n]: encoded from uint8 images, or given."""
    if (context_images is None) == (context_tokens is None):
        raise InputError("context_images: pass exactly one of context_images / context_tokens")
    name = "context_images" if context_tokens is None else "context_tokens"
    value = context_images if context_tokens is None else context_tokens
    batch = len(value) if hasattr(value, "__len__") else 0
    if batch < 1 or (max_batch is not None and batch > max_batch):
        limit = "" if max_batch is None else f" and at most max_batch={max_batch}"
        raise InputError(f"{name}: batch must be at least 1{limit}, got {batch}")
    if context_tokens is None:
        images = _as_uint8_images(context_images, name=name, batch=batch, steps=None,
                                  size=tuple(model.image_size))
        tokens = model.encode_images(images) if 1 <= images.shape[1] <= max_context else None
        t = images.shape[1]
    else:
        tokens = torch.as_tensor(context_tokens)
        n, v_img = model.tokens_per_image, image_vocab_size(model)
        if tokens.ndim != 3 or tokens.shape[2] != n or tokens.dtype.is_floating_point:
            raise InputError(f"{name}: expected integers of shape (B, T, {n}), "
                             f"got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= v_img):
            raise InputError(f"{name}: image tokens must lie in [0, {v_img})")
        t = tokens.shape[1]
    if not 1 <= t <= max_context:
        raise InputError(f"{name}: expected 1..{max_context} context steps, got {t}")
    return tokens.to(device=model.device, dtype=torch.long)


def prepare_rollout(
    model,
    *,
    context_images=None,
    context_tokens=None,
    context_actions,
    steps: int,
    mode: str,
    actions=None,
    observations=None,
    seeds,
    max_context: int | None = None,
    max_batch: int | None = None,
    decode_images: bool = True,
) -> _Rollout:
    """Check every argument (InputError naming it) and turn inputs into tokens."""
    if mode not in MODES:
        raise InputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps: expected an integer >= 0, got {steps!r}")
    seq_len = seq_len_steps(model)
    max_context = seq_len if max_context is None else max_context
    if isinstance(max_context, bool) or not isinstance(max_context, int):
        raise InputError(f"max_context: expected an integer, got {max_context!r}")
    if not 1 <= max_context <= seq_len:
        raise InputError(f"max_context: must be between 1 and {seq_len}, got {max_context}")
    ctx_tokens = _context_tokens(model, context_images=context_images,
                                 context_tokens=context_tokens, max_batch=max_batch,
                                 max_context=max_context)  # [B, T, n]
    batch, t = ctx_tokens.shape[:2]
    v_img = image_vocab_size(model)
    device = model.device
    ctx_actions = _action_tokens(context_actions, name="context_actions", batch=batch, steps=t,
                                 v_img=v_img, device=device)
    given = obs_tokens = obs_images = None
    if mode == "world_model":
        if actions is None:
            raise InputError("actions: world_model mode needs the action after each frame")
        given = _action_tokens(actions, name="actions", batch=batch, steps=steps, v_img=v_img,
                               device=device)
    elif actions is not None:
        raise InputError(f"actions: only used in world_model mode, not {mode}")
    if mode == "policy":
        if observations is None:
            raise InputError("observations: policy mode needs the frame of every step")
        obs = _as_uint8_images(observations, name="observations", batch=batch, steps=steps,
                               size=tuple(model.image_size))
        obs_images = obs.cpu().numpy()
        obs_tokens = model.encode_images(obs).to(device) if steps else None
    elif observations is not None:
        raise InputError(f"observations: only used in policy mode, not {mode}")
    return _Rollout(
        history=torch.cat([ctx_tokens, ctx_actions], dim=2),
        given_actions=given,
        observations=obs_tokens,
        observation_images=obs_images,
        seeds=seeds_to_tensor(seeds, batch=batch, device=device),
        steps=steps,
        mode=mode,
        max_context=max_context,
        action_offsets=torch.from_numpy(action_token_ranges(v_img)[:, 0]),
        decode_images=decode_images,
    )


def _generated_positions(mode: str, n: int, tps: int) -> range:
    """Positions within a step that the model samples in each mode."""
    return {"full": range(0, tps), "world_model": range(0, n), "policy": range(n, tps)}[mode]


def _finish_step(model, r: _Rollout, *, index: int, generated: torch.Tensor) -> tuple:
    """Complete the step's tokens [B, tps] and build its StepOutput."""
    n = model.tokens_per_image
    if r.mode == "world_model":
        step = torch.cat([generated, r.given_actions[:, index]], dim=1)
    elif r.mode == "policy":
        step = torch.cat([r.observations[:, index], generated], dim=1)
    else:
        step = generated
    image_tokens = step[:, :n].cpu()
    action_tokens = step[:, n:].cpu()
    if r.mode == "policy":
        images = r.observation_images[:, index]
    elif r.decode_images:
        images = model.decode_tokens(step[:, None, :n])[:, 0]
    else:
        images = None
    out = StepOutput(
        index=index,
        image_tokens=image_tokens,
        images=images,
        actions=action_tokens - r.action_offsets,
        action_source="given" if r.mode == "world_model" else "model",
    )
    return step, out


def _advance(history: torch.Tensor, step: torch.Tensor, max_context: int) -> torch.Tensor:
    """Append a step [B, tps] to the history [B, h, tps], dropping the oldest at the cap."""
    if history.shape[1] >= max_context:
        history = history[:, 1:]
    return torch.cat([history, step[:, None]], dim=1)


# ---- the decode loop -------------------------------------------------------------------


def prefill(gpt: GPT, tokens: torch.Tensor, *, k, v, start: int) -> torch.Tensor:
    """Feed tokens [B, L] at positions start.. (a whole window or an unseen tail) -> [B, V]."""
    return gpt.forward_cached(tokens, k_cache=k, v_cache=v, start=start)


def decode_one_token(step_fn: Callable, token: torch.Tensor, *, pos: int) -> torch.Tensor:
    return step_fn(token[:, None], pos)  # [B] -> logits [B, V]


def decode_n_tokens(
    step_fn: Callable,
    logits: torch.Tensor,
    *,
    positions: range,
    start_pos: int,
    sample: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """Sample one token per step-position in `positions`, feeding each but the last.
    logits [B, V] are those of the token before the first position -> tokens [B, P]."""
    out = []
    for i, j in enumerate(positions):
        token = sample(logits, j)  # [B]
        out.append(token)
        if i + 1 < len(positions):
            logits = decode_one_token(step_fn, token, pos=start_pos + i)
    return torch.stack(out, dim=1)


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


class RolloutEngine:
    """Runs B <= max_batch rollouts in lockstep on one model; the KV cache is allocated once."""

    def __init__(self, model, *, max_batch: int, compile: bool = False) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        self.model = model
        self.gpt: GPT = model.gpt
        self.max_batch = max_batch
        self.device = torch.device(model.device)
        self.dtype = model.dtype
        cfg = self.gpt.config
        self.tps = model.tokens_per_step
        self.cache = KVCache(cfg, batch=max_batch, max_seq=cfg.block_size, device=self.device,
                             dtype=self.dtype)
        ranges = step_token_ranges(image_vocab_size=image_vocab_size(model),
                                   tokens_per_image=model.tokens_per_image).to(self.device)
        self.lo, self.hi = ranges[:, 0], ranges[:, 1]
        # Graph capture / compile need fixed shapes: the static decode attends over the whole
        # cache with a mask. Eager decode slices the cache to the filled length instead.
        self.static = compile and self.device.type == "cuda"
        self.use_flash = flash_available(self.device, self.dtype) and not self.static
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._static_decode = StaticDecode(self.gpt, self.cache)
        if self.static:
            self._static_decode = torch.compile(self._static_decode, mode="reduce-overhead")
        self._owner: object | None = None
        self.prefills = 0  # chunk forwards from position 0 (a new window)
        self.extends = 0  # chunk forwards appended to a cached window

    @staticmethod
    def kv_cache_bytes(model, batch: int) -> int:
        cfg = model.gpt.config
        return KVCache.bytes_for(cfg, batch=batch, max_seq=cfg.block_size, dtype=model.dtype)

    def _step_fn(self, k: torch.Tensor, v: torch.Tensor) -> Callable:
        if self.static or self.use_flash:
            def step(token: torch.Tensor, pos: int) -> torch.Tensor:
                self._pos.fill_(pos)  # a device-side write, not a host sync
                return self._static_decode(token, self._pos, use_flash=self.use_flash)
            return step
        return lambda token, pos: self.gpt.forward_cached(token, k_cache=k, v_cache=v, start=pos)

    def rollout(
        self,
        *,
        context_images=None,
        context_actions,
        steps: int,
        mode: str,
        actions=None,
        observations=None,
        sampling: SamplingParams | None = None,
        seeds,
        max_context: int | None = None,
        decode_images: bool = True,
        context_tokens=None,
    ) -> Iterator[StepOutput]:
        """Yield one StepOutput per generated step (see the module docstring).

        max_context (default: the model's 10 steps) caps the history like the reference
        server's max_context_length; decode_images=False skips the pixel decoder (token-only
        benchmarks) and leaves StepOutput.images None; context_tokens (B, T, n) may replace
        context_images with already-encoded frames (the reference server accepts both)."""
        sampling = sampling or SamplingParams()
        r = prepare_rollout(self.model, context_images=context_images,
                            context_tokens=context_tokens, context_actions=context_actions,
                            steps=steps, mode=mode, actions=actions,
                            observations=observations, seeds=seeds, max_context=max_context,
                            max_batch=self.max_batch, decode_images=decode_images)
        return self._run(r, sampling)

    def _run(self, r: _Rollout, sampling: SamplingParams) -> Iterator[StepOutput]:
        batch = r.history.shape[0]
        k, v = self.cache.rows(batch)
        step_fn = self._step_fn(k, v)
        n, tps = self.model.tokens_per_image, self.tps
        seq_len = seq_len_steps(self.model)
        positions = _generated_positions(r.mode, n, tps)
        history = r.history
        first_abs = 0  # absolute index of history[:, 0]
        cached_first, cached = -1, 0  # window start (absolute) the cache holds, tokens held
        self._owner = owner = object()  # the cache belongs to the rollout that ran last

        def sample_at(index: int):
            return lambda logits, j: sample_tokens(
                logits, params=sampling, lo=self.lo[j], hi=self.hi[j], seeds=r.seeds,
                counter=index * tps + j)

        for index in range(r.steps):
            if self._owner is not owner:
                raise RuntimeError("another rollout ran on this engine's cache meanwhile; "
                                   "finish one rollout before advancing the next")
            with torch.no_grad():
                drop = _window(history.shape[1], seq_len)
                window = history[:, drop:].reshape(batch, -1)  # [B, W * tps]
                if cached_first != first_abs + drop:
                    cached_first, cached = first_abs + drop, 0
                feed = window[:, cached:]
                if r.mode == "policy":
                    feed = torch.cat([feed, r.observations[:, index]], dim=1)
                logits = prefill(self.gpt, feed, k=k, v=v, start=cached)
                self.prefills += cached == 0
                self.extends += cached > 0
                start_pos = cached + feed.shape[1]
                generated = decode_n_tokens(step_fn, logits, positions=positions,
                                            start_pos=start_pos, sample=sample_at(index))
                cached = start_pos + len(positions) - 1
                step, out = _finish_step(self.model, r, index=index, generated=generated)
                if history.shape[1] >= r.max_context:
                    first_abs += 1
                history = _advance(history, step, r.max_context)
            yield out


def naive_rollout(
    model,
    *,
    context_images=None,
    context_actions,
    steps: int,
    mode: str,
    actions=None,
    observations=None,
    sampling: SamplingParams | None = None,
    seeds,
    max_context: int | None = None,
    context_tokens=None,
) -> list[StepOutput]:
    """The slow reference: every token recomputes the whole window from position 0 with
    `GPT.forward`; same window rule and same sampler. For tests and the speed benchmark."""
    sampling = sampling or SamplingParams()
    r = prepare_rollout(model, context_images=context_images, context_tokens=context_tokens,
                        context_actions=context_actions,
                        steps=steps, mode=mode, actions=actions, observations=observations,
                        seeds=seeds, max_context=max_context)
    n, tps = model.tokens_per_image, model.tokens_per_step
    seq_len = seq_len_steps(model)
    ranges = step_token_ranges(image_vocab_size=image_vocab_size(model),
                               tokens_per_image=n).to(model.device)
    history, outputs = r.history, []
    with torch.no_grad():
        for index in range(r.steps):
            batch = history.shape[0]
            seq = history[:, _window(history.shape[1], seq_len):].reshape(batch, -1)
            if r.mode == "policy":
                seq = torch.cat([seq, r.observations[:, index]], dim=1)
            new = []
            for j in _generated_positions(r.mode, n, tps):
                logits = model.gpt(torch.cat([seq, *[t[:, None] for t in new]], dim=1))[:, -1]
                new.append(sample_tokens(logits, params=sampling, lo=ranges[j, 0],
                                         hi=ranges[j, 1], seeds=r.seeds, counter=index * tps + j))
            step, out = _finish_step(model, r, index=index, generated=torch.stack(new, dim=1))
            history = _advance(history, step, r.max_context)
            outputs.append(out)
    return outputs


def max_batch_for_memory(model, free_bytes: int) -> int:
    """Largest batch whose KV cache plus working memory fits in free_bytes (weights already
    loaded). Keeps 10% headroom; 0 when not even one rollout fits."""
    cfg = model.gpt.config
    item = torch.empty((), dtype=model.dtype).element_size()
    # Prefill of a full window: residual, q/k/v, attention out and the 4x MLP activation.
    working = cfg.block_size * cfg.n_embd * 12 * item + cfg.vocab_size * 4 * 4
    per_row = RolloutEngine.kv_cache_bytes(model, 1) + working
    return max(0, int(free_bytes * 0.9) // per_row)
