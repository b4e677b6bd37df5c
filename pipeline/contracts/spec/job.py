"""JobSpec: the whole job YAML, its sections (`pipeline.contracts.spec.sections`) and the
rules that join them."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from pipeline.contracts.secrets import public_data
from pipeline.contracts.spec.sections import (
    ModelSection,
    OutputSection,
    ResourcesSection,
    RolloutsSection,
    RunSection,
    SeedsSection,
    _Section,
)


class JobSpec(_Section):
    run: RunSection = Field(description="Identity of the run.")
    model: ModelSection = Field(description="Which WHAM model each actor loads.")
    seeds: SeedsSection = Field(description="Seed frames the rollouts start from.")
    rollouts: RolloutsSection = Field(description="What to generate from each seed.")
    resources: ResourcesSection = Field(
        default_factory=ResourcesSection, description="Actors and batching."
    )
    output: OutputSection = Field(description="Where outputs go.")

    @model_validator(mode="after")
    def _endpoint_modes(self) -> JobSpec:
        if self.model.endpoint is None:
            return self
        if self.rollouts.mode == "policy":
            raise ValueError("rollouts.mode policy needs a local model: the Muse protocol "
                             "predicts the next frame and its action together; use "
                             "world_model or full with model.endpoint")
        if self.resources.gpus_per_actor > 0:
            raise ValueError("model.endpoint: actors call the endpoint and need no GPU; set "
                             "resources.gpus_per_actor to 0")
        if self.rollouts.decoding != "sequential":  # an endpoint decodes as it was started
            raise ValueError("rollouts.decoding is the endpoint's: wham-batch serve --decoding")
        return self

    @model_validator(mode="after")
    def _plan_within_caps(self) -> JobSpec:
        # The seed count is known after discovery (pipeline.contracts.plan.check_plan_size); one
        # seed is enough to catch a per_seed or steps typo here.
        seeds = self.seeds.limit or 1
        rollouts = seeds * self.rollouts.per_seed
        if rollouts > self.run.max_rollouts:
            raise ValueError(
                f"rollouts.per_seed: {rollouts} rollouts from {seeds} seed(s) is more than "
                f"run.max_rollouts={self.run.max_rollouts}; lower it, or raise run.max_rollouts "
                "if you mean it")
        if rollouts * self.rollouts.steps > self.run.max_steps:
            raise ValueError(
                f"rollouts: {rollouts} rollouts x {self.rollouts.steps} steps is more than "
                f"run.max_steps={self.run.max_steps}; lower them, or raise run.max_steps if "
                "you mean it")
        return self

    @model_validator(mode="after")
    def _mode_needs_recordings(self) -> JobSpec:
        needs_recording = self.rollouts.mode == "policy" or self.rollouts.actions.kind == "replay"
        if needs_recording and self.seeds.format == "images":
            raise ValueError("rollouts.mode policy and rollouts.actions replay need recorded "
                             "clips: set seeds.format to wham-npz, demonstrator or manifest")
        if self.model.endpoint is not None and self.output.frames == "none":
            raise ValueError("output.frames none keeps only image tokens, which an endpoint "
                             "need not send and nothing here could decode: store frames "
                             "(output.frames parquet or png) with model.endpoint")
        return self

    def public_dict(self) -> dict[str, Any]:
        """The spec as plain data with credentials stripped from every URL (for manifests)."""
        return public_data(self.model_dump(mode="json"))
