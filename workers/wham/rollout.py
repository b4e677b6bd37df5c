"""A rollout's inputs, validated once (`Rollout`), and the step bookkeeping shared by the
engine and the naive reference: the window rule, the history, and turning a step's tokens into
a `StepOutput`.

B rollouts advance in lockstep. A step is `n` image tokens then 16 action tokens; the window
the model sees follows the reference: at most `seq_len - 1` whole steps of the history, laid
out from position 0 (the oldest step is dropped when the history holds `seq_len`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from workers.wham.actions import ACTION_DIM, action_token_ranges, validate_actions
from workers.wham.errors import InputError
from workers.wham.model import WHAMModel
from workers.wham.modes import DECODINGS, MODES
from workers.wham.sampling import SamplingParams, seeds_to_tensor


@dataclass
class StepOutput:
    """One generated step of B rollouts. The quality statistics are per row, float32 on the
    CPU: mean log-probability and entropy of the sampled image / action tokens (NaN for a kind
    the mode does not sample) and the fraction of image tokens that differ from the previous
    frame's."""

    index: int  # 0-based among generated steps
    image_tokens: torch.Tensor  # [B, n] int64, CPU
    images: np.ndarray | None  # [B, 3, H, W] uint8 (None only with decode_images=False)
    actions: torch.Tensor  # [B, 16] int64, CPU, model form (buttons 0/1, stick bins)
    action_source: str  # "model" | "given"
    image_logprob: torch.Tensor | None = None  # [B]
    image_entropy: torch.Tensor | None = None  # [B]
    action_logprob: torch.Tensor | None = None  # [B]
    action_entropy: torch.Tensor | None = None  # [B]
    changed_fraction: torch.Tensor | None = None  # [B]


@dataclass(frozen=True)
class Rollout:
    """Validated inputs in token form, on the model's device (`prepare_rollout` builds it)."""

    history: torch.Tensor  # [B, T, tokens_per_step] the context
    seeds: torch.Tensor  # [B] int64
    steps: int
    mode: str
    max_context: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    given_actions: torch.Tensor | None = None  # [B, steps, 16] action tokens (world_model)
    observations: torch.Tensor | None = None  # [B, steps, n] image tokens (policy)
    observation_images: np.ndarray | None = None  # [B, steps, 3, H, W] uint8 (policy)
    decode_images: bool = True
    decoding: str = "sequential"  # or "diagonal" / "diagonal-checked" (workers.wham.modes)

    @property
    def batch(self) -> int:
        return self.history.shape[0]


# ---- validation ---------------------------------------------------------------------------


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
    tokens = validate_actions(arr, name=name) + action_token_ranges(v_img)[:, 0]
    return torch.from_numpy(tokens).to(device)


def _batch_size(value, *, name: str, max_batch: int | None) -> int:
    batch = len(value) if hasattr(value, "__len__") else 0
    if batch < 1 or (max_batch is not None and batch > max_batch):
        limit = "" if max_batch is None else f" and at most max_batch={max_batch}"
        raise InputError(f"{name}: batch must be at least 1{limit}, got {batch}")
    return batch


def _given_image_tokens(model: WHAMModel, tokens, *, name: str) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    n, v_img = model.tokens_per_image, model.image_vocab_size
    if tokens.ndim != 3 or tokens.shape[2] != n or tokens.dtype.is_floating_point:
        raise InputError(f"{name}: expected integers of shape (B, T, {n}), "
                         f"got {tokens.dtype} {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= v_img):
        raise InputError(f"{name}: image tokens must lie in [0, {v_img})")
    return tokens


def _context_tokens(model: WHAMModel, *, context_images, context_tokens, max_batch,
                    max_context) -> torch.Tensor:
    """Context frames as image tokens [B, T, n]: encoded from uint8 images, or given."""
    if (context_images is None) == (context_tokens is None):
        raise InputError("context_images: pass exactly one of context_images / context_tokens")
    name = "context_images" if context_tokens is None else "context_tokens"
    batch = _batch_size(context_images if context_tokens is None else context_tokens,
                        name=name, max_batch=max_batch)
    if context_tokens is None:
        images = _as_uint8_images(context_images, name=name, batch=batch, steps=None,
                                  size=tuple(model.image_size))
        t = images.shape[1]
        tokens = model.encode_images(images) if 1 <= t <= max_context else None
    else:
        tokens = _given_image_tokens(model, context_tokens, name=name)
        t = tokens.shape[1]
    if not 1 <= t <= max_context:
        raise InputError(f"{name}: expected 1..{max_context} context steps, got {t}")
    return tokens.to(device=model.device, dtype=torch.long)


def _check_mode_and_counts(model: WHAMModel, *, mode, decoding, steps, max_context) -> int:
    """Check mode, decoding and steps; returns max_context (default: the model's seq_len)."""
    if mode not in MODES:
        raise InputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if decoding not in DECODINGS:
        raise InputError(f"decoding: expected one of {', '.join(DECODINGS)}, got {decoding!r}")
    if decoding != "sequential" and mode == "policy":
        raise InputError(f"decoding: {decoding} orders the image tokens a rollout generates; "
                         "policy mode generates none (its frames are given): use sequential")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps: expected an integer >= 0, got {steps!r}")
    seq_len = model.seq_len
    max_context = seq_len if max_context is None else max_context
    if isinstance(max_context, bool) or not isinstance(max_context, int):
        raise InputError(f"max_context: expected an integer, got {max_context!r}")
    if not 1 <= max_context <= seq_len:
        raise InputError(f"max_context: must be between 1 and {seq_len}, got {max_context}")
    return max_context


def _world_model_actions(model: WHAMModel, actions, *, mode: str, batch: int, steps: int):
    if mode != "world_model":
        if actions is not None:
            raise InputError(f"actions: only used in world_model mode, not {mode}")
        return None
    if actions is None:
        raise InputError("actions: world_model mode needs the action after each frame")
    return _action_tokens(actions, name="actions", batch=batch, steps=steps,
                          v_img=model.image_vocab_size, device=model.device)


def _policy_observations(model: WHAMModel, observations, *, mode: str, batch: int, steps: int):
    """(image tokens [B, steps, n] | None, uint8 images [B, steps, 3, H, W] | None)."""
    if mode != "policy":
        if observations is not None:
            raise InputError(f"observations: only used in policy mode, not {mode}")
        return None, None
    if observations is None:
        raise InputError("observations: policy mode needs the frame of every step")
    obs = _as_uint8_images(observations, name="observations", batch=batch, steps=steps,
                           size=tuple(model.image_size))
    tokens = model.encode_images(obs).to(model.device) if steps else None
    return tokens, obs.cpu().numpy()


def prepare_rollout(
    model: WHAMModel,
    *,
    context_images=None,
    context_tokens=None,
    context_actions,
    steps: int,
    mode: str,
    actions=None,
    observations=None,
    sampling: SamplingParams | None = None,
    seeds,
    max_context: int | None = None,
    decode_images: bool = True,
    max_batch: int | None = None,
    decoding: str = "sequential",
) -> Rollout:
    """Check every argument (InputError naming it) and turn the inputs into tokens."""
    max_context = _check_mode_and_counts(model, mode=mode, decoding=decoding, steps=steps,
                                         max_context=max_context)
    ctx_tokens = _context_tokens(model, context_images=context_images,
                                 context_tokens=context_tokens, max_batch=max_batch,
                                 max_context=max_context)  # [B, T, n]
    batch, t = ctx_tokens.shape[:2]
    ctx_actions = _action_tokens(context_actions, name="context_actions", batch=batch, steps=t,
                                 v_img=model.image_vocab_size, device=model.device)
    obs_tokens, obs_images = _policy_observations(model, observations, mode=mode, batch=batch,
                                                  steps=steps)
    return Rollout(
        history=torch.cat([ctx_tokens, ctx_actions], dim=2),
        seeds=seeds_to_tensor(seeds, batch=batch, device=model.device),
        steps=steps, mode=mode, max_context=max_context,
        sampling=sampling or SamplingParams(),
        given_actions=_world_model_actions(model, actions, mode=mode, batch=batch, steps=steps),
        observations=obs_tokens, observation_images=obs_images, decode_images=decode_images,
        decoding=decoding,
    )


# ---- steps --------------------------------------------------------------------------------


def generated_positions(mode: str, n: int, tps: int) -> range:
    """Positions within a step that the model samples in each mode."""
    return {"full": range(0, tps), "world_model": range(0, n), "policy": range(n, tps)}[mode]


@dataclass
class History:
    """The steps the model may see, in token form [B, h, tps], and the absolute index of the
    first of them (it grows by one each time the history drops its oldest step)."""

    tokens: torch.Tensor
    first: int = 0

    def window(self, seq_len: int) -> tuple[int, torch.Tensor]:
        """(absolute index of the window's first step, its tokens [B, W * tps]). The reference
        drops the oldest step when the history is full: at most seq_len - 1 steps."""
        drop = 1 if self.tokens.shape[1] >= seq_len else 0
        return self.first + drop, self.tokens[:, drop:].reshape(self.tokens.shape[0], -1)

    def append(self, step: torch.Tensor, *, max_context: int) -> None:
        """Add a step [B, tps], dropping the oldest at the cap."""
        tokens = self.tokens
        if tokens.shape[1] >= max_context:
            tokens, self.first = tokens[:, 1:], self.first + 1
        self.tokens = torch.cat([tokens, step[:, None]], dim=1)


def complete_step(r: Rollout, *, index: int, generated: torch.Tensor, n: int) -> torch.Tensor:
    """The step's tokens [B, tps]: the generated positions plus what the mode gives."""
    if r.mode == "world_model":
        return torch.cat([generated, r.given_actions[:, index]], dim=1)
    if r.mode == "policy":
        return torch.cat([r.observations[:, index], generated], dim=1)
    return generated


def step_output(
    model: WHAMModel, r: Rollout, *, index: int, step: torch.Tensor, previous: torch.Tensor,
    stats: dict[str, torch.Tensor],
) -> StepOutput:
    """StepOutput of a completed step [B, tps]; previous [B, n] is the frame before it."""
    n = model.tokens_per_image
    if r.mode == "policy":
        images = r.observation_images[:, index]
    elif r.decode_images:
        images = model.decode_tokens(step[:, None, :n])[:, 0]
    else:
        images = None
    offsets = torch.from_numpy(action_token_ranges(model.image_vocab_size)[:, 0])
    return StepOutput(
        index=index,
        image_tokens=step[:, :n].cpu(),
        images=images,
        actions=step[:, n:].cpu() - offsets,
        action_source="given" if r.mode == "world_model" else "model",
        changed_fraction=(step[:, :n] != previous).float().mean(dim=1).cpu(),
        **stats,
    )
