"""JobSpec: the validated form of a job YAML (`job`; its sections in `sections`, loading in
`load`)."""

from __future__ import annotations

from pipeline.contracts.spec.job import JobSpec
from pipeline.contracts.spec.load import (
    apply_overrides,
    dump_spec,
    format_validation_error,
    load_spec,
    parse_overrides,
    spec_from_data,
)
from pipeline.contracts.spec.sections import (
    ActionsSpec,
    ModelSection,
    OutputSection,
    ResourcesSection,
    RolloutsSection,
    RunSection,
    SamplingSpec,
    SeedsSection,
)

__all__ = [
    "ActionsSpec",
    "JobSpec",
    "ModelSection",
    "OutputSection",
    "ResourcesSection",
    "RolloutsSection",
    "RunSection",
    "SamplingSpec",
    "SeedsSection",
    "apply_overrides",
    "dump_spec",
    "format_validation_error",
    "load_spec",
    "parse_overrides",
    "spec_from_data",
]
