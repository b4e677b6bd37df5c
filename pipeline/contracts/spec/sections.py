"""The job spec's sections: one pydantic model per YAML section (the whole job,
JobSpec, in `pipeline.contracts.spec.job`).

`extra="forbid"` everywhere and a description on every field, so `wham-batch validate` can
name the YAML path of any mistake and print the schema. Loading YAML, `--set` overrides and
error formatting live in `pipeline.contracts.spec.load`.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import string
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

from pipeline.contracts.choices import (
    ACTION_KINDS,
    DECODINGS,
    DEVICES,
    DTYPES,
    FRAME_MODES,
    MODES,
    SEED_FORMATS,
    SEED_SCOPES,
)
from pipeline.contracts.errors import UserError
from pipeline.contracts.layout import check_run_id
from pipeline.contracts.secrets import check_endpoint_url
from pipeline.contracts.sources import constant_action
from pipeline.contracts.storage import check_s3_endpoint

_RUN_ID_FIELDS = {"date", "name"}
#: Longest run id template and job name: the rendered id is at most 128 characters.
_MAX_TEMPLATE_CHARS = 256


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator("endpoint_url", mode="after", check_fields=False)
    @classmethod
    def _endpoint_has_no_secrets(cls, url: str | None) -> str | None:
        try:
            return check_s3_endpoint(url, what="endpoint")
        except UserError as exc:
            raise ValueError(str(exc)) from None


def _today_utc() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


class RunSection(_Section):
    name: str = Field(max_length=_MAX_TEMPLATE_CHARS,
                      description="Human name of the job; used in the run id template.")
    run_id: str = Field(
        default="{name}-{date}", max_length=_MAX_TEMPLATE_CHARS,
        description="Run id template; placeholders {date} (run_date, YYYY-MM-DD) and {name}. "
        "The rendered id names the output partition; rerunning the same id resumes it.",
    )
    run_date: dt.date = Field(default_factory=_today_utc, description="Partition date of "
                              "the run (YYYY-MM-DD); defaults to today in UTC.")
    seed: int = Field(default=0, ge=0, description="Base of every rollout's rng seed, mixed "
                      "with the seed id, the rollout index and (seed_scope run) the run id.")
    seed_scope: Literal[SEED_SCOPES] = Field(default="run", description=(
        "run: rng seeds mix in the run id (new rollouts per run id, the same ones on a rerun); "
        "config: they do not (every run id of the config repeats the same rollouts, as runs "
        "did before seed_scope; a run started then resumes with its seeds)."))
    max_failed_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        "Largest fraction of failed rollouts for which the run still exits 0."))
    max_rollouts: int = Field(
        default=1_000_000, ge=1,
        description="Most rollouts one run may plan (seeds x rollouts.per_seed): a guard "
        "against a typo that would exhaust the driver. Raise it for bigger runs.",
    )
    max_steps: int = Field(
        default=50_000_000, ge=1,
        description="Most generated steps one run may plan (rollouts x rollouts.steps). "
        "Raise it for bigger runs.",
    )

    @model_validator(mode="after")
    def _render_run_id(self) -> RunSection:
        try:
            parsed = list(string.Formatter().parse(self.run_id))
        except ValueError as exc:
            raise ValueError(f"run_id template {self.run_id!r} does not parse ({exc}); use "
                             "{date} and {name}, and {{ }} for literal braces") from None
        for _, name, spec, conversion in parsed:
            if name is not None and (spec or conversion):
                found = f"{name}{'!' + conversion if conversion else ''}"
                found += f":{spec[:20]}" if spec else ""
                raise ValueError("run_id template: placeholders take no format spec or "
                                 f"conversion (found {{{found}}}); write {{{name}}}")
        fields = {f for _, f, _, _ in parsed if f is not None}
        unknown = fields - _RUN_ID_FIELDS
        if unknown:
            raise ValueError(f"run_id template uses unknown placeholder(s) {sorted(unknown)}; "
                             f"allowed: {{date}} {{name}}")
        rendered = self.run_id.format(date=self.run_date.isoformat(), name=self.name)
        try:
            self.run_id = check_run_id(rendered)  # it names a partition folder
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self


class ModelSection(_Section):
    checkpoint: str | None = Field(
        default=None,
        description="Local path or s3:// URI of a native model folder or an official .ckpt.",
    )
    preset: str | None = Field(
        default=None, description="Named preset with random weights (tests, demos, benchmarks)."
    )
    device: Literal[DEVICES] = Field(
        default="auto", description="Where each actor runs its replica; auto picks cuda if present."
    )
    dtype: Literal[DTYPES] = Field(
        default="auto",
        description="Weights and compute dtype; auto: bfloat16 on cuda, else float32.",
    )
    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for an s3:// checkpoint (default: AWS or env)."
    )
    region: str | None = Field(default=None, description="S3 region for an s3:// checkpoint.")
    endpoint: str | None = Field(
        default=None,
        description="URL of a Muse-protocol endpoint (a hosted Muse/WHAM endpoint or "
        "`wham-batch serve`) to roll out with instead of a local model; actors need no GPU.",
    )
    api_key_env: str | None = Field(
        default="MUSE_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="Environment variable holding the endpoint's key (sent as a Bearer "
        "token); null for an endpoint without a key. The key itself is never a setting.",
    )
    max_concurrency: int = Field(
        default=16, ge=1, le=1024, description="Endpoint requests in flight per actor."
    )
    timeout_s: float = Field(
        default=60.0, gt=0.0, le=3600.0, description="Seconds one endpoint request may take."
    )
    max_attempts: int = Field(
        default=6, ge=1, le=50,
        description="Tries per endpoint request (timeouts, 429, 5xx, bad answers are retried "
        "with exponential backoff and jitter); then the rollout fails.",
    )
    backoff_s: float = Field(
        default=1.0, ge=0.0, le=600.0,
        description="First retry delay; it doubles per try (at most 60 s) with full jitter, "
        "or follows the endpoint's Retry-After.",
    )
    trust_env: bool = Field(
        default=False,
        description="Send endpoint requests through the proxy the environment names "
        "(HTTP_PROXY, HTTPS_PROXY, NO_PROXY). Off by default: the proxy would see the key.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSection:
        sources = [self.checkpoint, self.preset, self.endpoint]
        if sum(s is not None for s in sources) != 1:
            raise ValueError("set exactly one of model.checkpoint, model.preset and "
                             "model.endpoint")
        if self.endpoint is not None:
            check_endpoint_url(self.endpoint)
        return self


class SeedsSection(_Section):
    source: str = Field(description="Local folder or s3:// prefix holding the seeds.")
    format: Literal[SEED_FORMATS] = Field(
        default="images",
        description="images: one picture per seed; wham-npz: recorded clips (frames + actions); "
        "manifest: a CSV/Parquet listing seed files; demonstrator: folders of the WHAM "
        "Demonstrator (frames + actions.json), one seed per folder.",
    )
    glob: str | None = Field(
        default=None, description="Pattern that selects seed files (default depends on "
        "format; for demonstrator it selects folder names)."
    )
    limit: int | None = Field(default=None, gt=0, description="Use at most this many seeds.")
    context_steps: int = Field(
        default=1, ge=1, le=10, description="Steps of context taken from each seed (1..10)."
    )
    max_file_mb: float = Field(
        default=256.0, gt=0.0, le=64 * 1024,
        description="Largest seed file (picture, clip or manifest) read, in MiB; a bigger "
        "one becomes a failed rollout (a manifest: an error) instead of being read whole.",
    )
    endpoint_url: str | None = Field(default=None, description="S3 endpoint for an s3:// source.")
    region: str | None = Field(default=None, description="S3 region for an s3:// source.")


class ActionsSpec(_Section):
    kind: Literal[ACTION_KINDS] = Field(
        default="random",
        description="random: sampled per step from the rollout's rng; constant: `value` every "
        "step; file: a scripted CSV/Parquet (`path`); replay: the actions recorded in the seed.",
    )
    value: list[float] | dict[str, Any] | None = Field(
        default=None,
        description="For constant: 16 numbers, 12 buttons (0/1) then 4 sticks in [-1, 1]; or "
        "a mapping {buttons: [button_A, ...], left_stick_x: 0.5, ...}.",
    )
    path: str | None = Field(
        default=None,
        description="For file: local path or s3:// URI of a CSV/Parquet, one column per action.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `actions: random` is the common case; accept the bare kind as a string.
        return {"kind": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ActionsSpec:
        if self.kind == "constant":
            if self.value is None:
                raise ValueError("kind constant needs `value`: 16 numbers (12 buttons, 4 sticks)")
            try:
                constant_action(self.value)  # the same check the actors apply
            except UserError as exc:
                raise ValueError(str(exc)) from None
        elif self.value is not None:
            raise ValueError(f"`value` is only used with kind constant, not {self.kind}")
        if (self.kind == "file") != (self.path is not None):
            raise ValueError("`path` is required for kind file and only used there")
        return self


class SamplingSpec(_Section):
    temperature: float = Field(default=0.9, ge=0.1, le=10.0, description="Softmax temperature.")
    top_k: int | None = Field(default=None, ge=1, description="Keep only the k likeliest tokens.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    greedy: bool = Field(default=False, description="Always take the likeliest token.")


class RolloutsSection(_Section):
    per_seed: int = Field(default=1, gt=0, description="Rollouts generated from each seed.")
    steps: int = Field(gt=0, le=10_000, description="Generated steps per rollout.")
    mode: Literal[MODES] = Field(default="world_model", description="world_model: frames from "
                                 "given actions; policy: actions from recorded frames; full: "
                                 "the model predicts both.")
    actions: ActionsSpec = Field(default_factory=ActionsSpec,
                                 description="Where given actions come from (world_model).")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Token sampling.")
    decoding: Literal[DECODINGS] = Field(default="sequential", description="Image tokens one "
                                         "per pass (exact), one grid diagonal per pass, or "
                                         "diagonal with each row's first token checked.")

    @model_validator(mode="after")
    def _decoding_has_image_tokens(self) -> RolloutsSection:
        if self.decoding != "sequential" and self.mode == "policy":
            raise ValueError(f"rollouts.decoding {self.decoding} orders the image tokens a "
                             "rollout generates; rollouts.mode policy generates none (its "
                             "frames are recorded): drop rollouts.decoding")
        return self


class ResourcesSection(_Section):
    actors: int = Field(default=1, ge=1, le=4096, description="Ray actors, one replica each.")
    gpus_per_actor: float = Field(
        default=0.0, ge=0.0, description="GPUs per actor; fractions share a GPU between actors."
    )
    cpus_per_actor: float = Field(default=1.0, gt=0.0, description="CPUs reserved per actor.")
    batch_size: PositiveInt | Literal["auto"] = Field(
        default="auto",
        description="Rollouts decoded together per actor; auto sizes it from free accelerator "
        "memory (on the CPU a fixed default).",
    )
    rollouts_per_unit: PositiveInt | Literal["auto"] = Field(
        default="auto",
        description="Rollouts per work unit (the unit of retry and commit); auto: batch_size, "
        "or 16 when batch_size is auto.",
    )
    units_in_flight: int = Field(
        default=2, ge=1, le=64,
        description="Units queued per actor; >1 lets the next unit start while one is written.",
    )
    max_unit_attempts: int = Field(
        default=3, ge=1, le=20, description="Tries per unit when actors die under it."
    )
    max_restarts: int = Field(
        default=3, ge=0, le=100, description="Times Ray restarts a dead actor."
    )
    unit_timeout_s: float = Field(
        default=3600.0, gt=0.0,
        description="A unit running longer than this is treated as lost and resubmitted.",
    )

    def unit_size(self) -> int:
        if self.rollouts_per_unit != "auto":
            return self.rollouts_per_unit
        return self.batch_size if self.batch_size != "auto" else 16


class OutputSection(_Section):
    root: str = Field(description="Output root: a local folder or s3://bucket/prefix.")
    endpoint_url: str | None = Field(default=None, description="S3 endpoint for an s3:// root.")
    region: str | None = Field(default=None, description="S3 region for an s3:// root.")
    frames: Literal[FRAME_MODES] = Field(
        default="parquet",
        description="How frames are stored. parquet: the PNGs of a work unit in one Parquet "
        "part (frames table); png: one PNG object per frame; none: only the image tokens "
        "(decode later with `wham-batch decode` or the loader). true/false mean png/none.",
    )
    video: bool = Field(
        default=False, description="Also write one MP4 per rollout (needs PyAV: the video extra)."
    )
    previews: bool = Field(default=True, description="Write one animated GIF per rollout.")
    preview_scale: Annotated[int, Field(ge=1, le=8)] | Literal["auto"] = Field(
        default="auto",
        description="Lanczos upscale of previews, 1..8; auto: enough for small frames to be "
        "seen (their longer side reaches 256 pixels), 1 for large ones.",
    )
    image_tokens: bool = Field(default=True, description="Store image tokens in the steps table.")
    watermark: bool = Field(
        default=True, description="Draw 'Generated by WHAM' on generated frames (model card)."
    )
    writer_threads: int = Field(default=4, ge=1, le=64, description="Threads per actor's writer.")

    @model_validator(mode="before")
    @classmethod
    def _frames_as_bool(cls, data: Any) -> Any:
        # Schema version 1 had `frames: true|false` (PNGs or nothing).
        if isinstance(data, dict) and isinstance(data.get("frames"), bool):
            return {**data, "frames": "png" if data["frames"] else "none"}
        return data

    @model_validator(mode="after")
    def _frames_need_a_source(self) -> OutputSection:
        if self.frames == "none" and not self.image_tokens:
            raise ValueError("frames: none keeps only the image tokens; set image_tokens: true "
                             "or store frames (frames: parquet or png)")
        if self.video and importlib.util.find_spec("av") is None:
            raise ValueError("video: true needs PyAV; install the video extra "
                             "(.venv/bin/pip install -e '.[video]' in the project folder; "
                             "`make setup` already installs it) or set video: false")
        return self
