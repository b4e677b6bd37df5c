"""The named choices of a job in one place: the spec's Literals and the CLI's choices are
derived from these tuples, so adding a choice is one edit here plus its implementation."""

from __future__ import annotations

from workers.wham.modes import DECODINGS, MODES

#: Where seeds come from (pipeline.contracts.sources, pipeline.driver.discovery,
#: workers.actor.inputs).
SEED_FORMATS = ("images", "wham-npz", "manifest", "demonstrator")
#: Where the given actions of world-model rollouts come from (workers.actor.inputs.make_actions).
ACTION_KINDS = ("random", "constant", "file", "replay")
#: Where a replica runs and in which precision.
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: How generated frames are stored (workers.actor.writer): a Parquet part of PNGs per work unit,
#: one PNG object per frame, or not at all (only the image tokens; decoded on read).
FRAME_MODES = ("parquet", "png", "none")
#: What every rollout's RNG seed mixes with `run.seed` (pipeline.contracts.plan): the run id
#: as well (new data per run, reproducible per run id), or only the config.
SEED_SCOPES = ("run", "config")

__all__ = ["ACTION_KINDS", "DECODINGS", "DEVICES", "DTYPES", "FRAME_MODES", "MODES",
           "SEED_FORMATS", "SEED_SCOPES"]
