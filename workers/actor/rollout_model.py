"""The actor's model: one interface in front of a local replica and a Muse endpoint.

`RolloutActor` rolls out through a `RolloutModel` and never asks which kind it holds. Both
carry the same model facts (id, weights digest, frame size, tokens per image and step, the
batch they take) and one method, `roll_out(batch, on_step=...)`: every step of every
rollout, context steps included, goes to `on_step` as soon as it exists (the actor hands it
to the writer), and one `Outcome` per rollout comes back: `Completed` with the rollout's
quality aggregates, or `Failed` with its error.

- `LocalModel`: a WHAM replica and its rollout engine on this process. A batch that raises
  fails as a whole; the actor turns it into failed rows.
- `EndpointModel`: rollouts through a Muse-protocol endpoint (`EndpointBackend`). Each
  rollout fails on its own; one the endpoint kept failing is `retryable`. An endpoint sends
  no probabilities, so its rollouts have no quality aggregates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline.contracts.layout import STEP_QUALITY_COLUMNS
from pipeline.contracts.quality import rollout_quality
from pipeline.contracts.spec import JobSpec
from workers import wham
from workers.actor.endpoint import EndpointBackend, EndpointError, RolloutJob
from workers.actor.replica import batch_size_for, load_replica


@dataclass(frozen=True, slots=True)
class RolloutInput:
    """One rollout's inputs in model form."""

    context_images: np.ndarray  # uint8 (T,3,H,W)
    context_actions: np.ndarray  # int64 (T,16)
    actions: np.ndarray | None  # int64 (steps,16): the given actions (world_model)
    observations: np.ndarray | None  # uint8 (steps,3,H,W): the recorded frames (policy)
    rng_seed: int


@dataclass(frozen=True, slots=True)
class Step:
    """One step of one rollout, as the writer takes it (`OutputWriter.add_step`)."""

    step: int  # 0-based over the whole rollout, context steps first
    image: np.ndarray | None  # uint8 (3,H,W); None when frames are not decoded
    action: np.ndarray  # int64 (16,) model form
    generated: bool
    action_source: str  # "seed" | "model" | "given"
    image_tokens: np.ndarray | None = None  # (n,)
    quality: Mapping[str, float] | None = None  # the step's signals (generated steps)


@dataclass(frozen=True, slots=True)
class Completed:
    """A rollout that ran to the end: its quality aggregates (`rollout_quality`; empty
    when the model sends no probabilities)."""

    quality: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failed:
    """A rollout that failed on its own (the endpoint gave up on it)."""

    error: BaseException


Outcome = Completed | Failed
#: Receives (index in the batch, step) for every step of every rollout.
StepSink = Callable[[int, Step], None]


class RolloutModel(Protocol):
    """What an actor needs of its model."""

    model_id: str
    sha256: str  # of the weights ("" when not known here)
    device: str
    dtype: str
    batch_size: int  # rollouts per `roll_out` call at most
    image_size: tuple[int, int]  # (H, W)
    tokens_per_image: int | None
    tokens_per_step: int

    def roll_out(self, batch: list[RolloutInput], *, on_step: StepSink) -> list[Outcome]:
        """Run the batch (rows share a context length); one outcome per row, in order."""
        ...

    def close(self) -> None: ...


def is_retryable(error: BaseException) -> bool:
    """Whether a rerun may complete a rollout that failed with `error` (an unreadable seed,
    an endpoint that kept failing); such errors say so with a `retryable` attribute."""
    return bool(getattr(error, "retryable", False))


def _per_row(values: Any, batch: int) -> np.ndarray:
    """A StepOutput signal as float32 (B,); NaN where the engine gave none."""
    if values is None:
        return np.full(batch, np.nan, dtype=np.float32)
    return np.asarray(values, dtype=np.float32).reshape(batch)


class LocalModel:
    """A WHAM replica on this process and its batched rollout engine."""

    def __init__(self, replica: Any, *, batch_size: int, steps: int, mode: str,
                 sampling: Any, decode_images: bool) -> None:
        self.replica = replica
        self.engine = wham.RolloutEngine(replica, max_batch=batch_size)
        self.batch_size = batch_size
        self.steps, self.mode, self.sampling = steps, mode, sampling
        # Without stored frames, previews or videos nobody needs pixels: skip the decoder.
        self.decode_images = decode_images
        self.model_id: str = replica.model_id
        self.sha256: str = replica.sha256
        self.device = str(replica.device)
        self.dtype = str(replica.dtype).split(".")[-1]
        self.image_size = tuple(replica.image_size)
        self.tokens_per_image: int | None = replica.tokens_per_image
        self.tokens_per_step: int = replica.tokens_per_step

    def roll_out(self, batch: list[RolloutInput], *, on_step: StepSink) -> list[Outcome]:
        ctx_images = np.stack([r.context_images for r in batch])  # (B,T,3,H,W)
        ctx_actions = np.stack([r.context_actions for r in batch])  # (B,T,16)
        # Encoded once here, so context steps get their tokens and the engine skips encoding.
        ctx_tokens = self.replica.encode_images(ctx_images)  # (B,T,n)
        t_ctx = ctx_images.shape[1]
        ctx_tokens_np = ctx_tokens.cpu().numpy()
        for b, r in enumerate(batch):  # context steps are rows too: every rollout is whole
            for t in range(t_ctx):
                on_step(b, Step(step=t, image=r.context_images[t], action=r.context_actions[t],
                                generated=False, action_source="seed",
                                image_tokens=ctx_tokens_np[b, t]))
        outputs = self.engine.rollout(
            context_tokens=ctx_tokens, context_actions=ctx_actions, steps=self.steps,
            mode=self.mode, sampling=self.sampling, seeds=[r.rng_seed for r in batch],
            actions=np.stack([r.actions for r in batch]) if self.mode == "world_model" else None,
            observations=(np.stack([r.observations for r in batch])
                          if self.mode == "policy" else None),
            decode_images=self.decode_images)
        signals: dict[str, list[np.ndarray]] = {name: [] for name in STEP_QUALITY_COLUMNS}
        for out in outputs:
            images, actions = out.images, out.actions.numpy()  # (B,3,H,W), (B,16)
            tokens = out.image_tokens.numpy()  # (B,n)
            step = {name: _per_row(getattr(out, name), len(batch))
                    for name in STEP_QUALITY_COLUMNS}  # name -> (B,)
            for name, values in step.items():
                signals[name].append(values)
            for b in range(len(batch)):
                on_step(b, Step(step=t_ctx + out.index,
                                image=None if images is None else images[b], action=actions[b],
                                generated=True, action_source=out.action_source,
                                image_tokens=tokens[b],
                                quality={k: v[b] for k, v in step.items()}))
        per_step = {k: np.stack(v, axis=1) if v else np.zeros((len(batch), 0), np.float32)
                    for k, v in signals.items()}  # name -> (B, steps)
        return [Completed(rollout_quality(
            {k: v[b] for k, v in per_step.items()}, first_step=t_ctx,
            tokens_per_image=self.replica.tokens_per_image,
            image_vocab_size=self.replica.image_vocab_size)) for b in range(len(batch))]

    def close(self) -> None:
        """Nothing to release: the replica goes with the process."""


class EndpointModel:
    """Rollouts through a Muse-protocol endpoint, with the facts its probe learnt."""

    def __init__(self, backend: EndpointBackend, *, batch_size: int, steps: int,
                 mode: str) -> None:
        self.backend = backend
        self.steps, self.mode = steps, mode
        self.batch_size = batch_size
        self.model_id: str = backend.model_id
        self.sha256: str = backend.sha256
        self.device: str = backend.device
        self.dtype: str = backend.dtype
        self.image_size = tuple(backend.image_size)
        self.tokens_per_image: int | None = backend.tokens_per_image
        self.tokens_per_step: int = backend.tokens_per_step

    def roll_out(self, batch: list[RolloutInput], *, on_step: StepSink) -> list[Outcome]:
        jobs = [RolloutJob(context_images=r.context_images, context_actions=r.context_actions,
                           actions=r.actions, rng_seed=r.rng_seed) for r in batch]
        outcomes: dict[int, Outcome] = {}
        for b, result in self.backend.rollouts(jobs, steps=self.steps, mode=self.mode):
            if isinstance(result, EndpointError):
                outcomes[b] = Failed(result)
                continue
            r = batch[b]
            t_ctx = len(r.context_images)
            for t in range(t_ctx):
                on_step(b, Step(step=t, image=r.context_images[t], action=r.context_actions[t],
                                generated=False, action_source="seed"))
            for k, record in enumerate(result):
                on_step(b, Step(step=t_ctx + k, image=record.image, action=record.action,
                                generated=True, action_source=record.source,
                                image_tokens=record.tokens))
            outcomes[b] = Completed()
        return [outcomes[b] for b in range(len(batch))]  # the backend answers every job

    def close(self) -> None:
        self.backend.close()


def open_model(spec: JobSpec) -> RolloutModel:
    """The job's model: its endpoint (`model.endpoint`), else a local replica."""
    m, s, r = spec.model, spec.rollouts.sampling, spec.rollouts
    if m.endpoint is not None:
        backend = EndpointBackend(
            url=m.endpoint, api_key_env=m.api_key_env, max_concurrency=m.max_concurrency,
            timeout_s=m.timeout_s, max_attempts=m.max_attempts, backoff_s=m.backoff_s,
            sampling={"temperature": s.temperature, "top_k": 1 if s.greedy else s.top_k,
                      "top_p": s.top_p}, trust_env=m.trust_env)
        # As many rollouts per batch as requests may be in flight.
        return EndpointModel(backend, batch_size=m.max_concurrency, steps=r.steps, mode=r.mode)
    replica = load_replica(checkpoint=m.checkpoint, preset=m.preset, device=m.device,
                           dtype=m.dtype, seed=spec.run.seed,
                           threads=spec.resources.cpus_per_actor,
                           endpoint_url=m.endpoint_url, region=m.region)
    o = spec.output
    return LocalModel(
        replica, batch_size=batch_size_for(replica, spec.resources.batch_size), steps=r.steps,
        mode=r.mode, decode_images=o.frames != "none" or o.previews or o.video,
        sampling=wham.SamplingParams(temperature=s.temperature, top_k=s.top_k,
                                     top_p=s.top_p, greedy=s.greedy))
