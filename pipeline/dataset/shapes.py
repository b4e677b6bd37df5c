"""One shape per selection: the check that the selected runs' steps can share a batch.

Runs written by models of different frame sizes or token counts (or one run storing image
tokens and another not) give windows whose arrays do not stack: a PyTorch DataLoader would
fail mid-epoch in its collate function, and a LeRobot dataset has one shape per feature.
So the loader and the exports read the first rollout of every selected run (its unit's
steps part and frames; nothing at all when one run is selected) and refuse a selection
whose runs disagree, naming each group of runs with its model and shapes, and how to
select one group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pipeline.contracts.errors import UserError
from pipeline.dataset.index import Shard
from pipeline.dataset.reader import UnitReader
from pipeline.dataset.windows import rollout_arrays

#: (array name, shape of one step, dtype) for every array of a window.
Signature = tuple[tuple[str, tuple[int, ...], str], ...]


def run_signature(reader: UnitReader, shard: Shard) -> Signature:
    """The per-step shapes of the first rollout of `shard` (as windows carry them)."""
    first = reader.read(dataclasses.replace(shard, rollouts=shard.rollouts[:1]))[0]
    arrays = rollout_arrays(first)
    return tuple(sorted((name, tuple(a.shape[1:]), a.dtype.str) for name, a in arrays.items()))


def describe(signature: Signature) -> str:
    """'frames 3x16x16, 16 image tokens' for a signature."""
    shapes = {name: shape for name, shape, _ in signature}
    frames = shapes.get("frames")
    tokens = shapes.get("image_tokens")
    return ", ".join([
        "frames " + "x".join(str(n) for n in frames) if frames is not None else "no frames",
        f"{tokens[0]} image tokens" if tokens is not None else "no image tokens",
    ])


def check_one_shape(reader: UnitReader, shards: Sequence[Shard], *, root: str,
                    option: str = "run_id=") -> None:
    """UserError when the selected runs' steps have different shapes. `option` is how the
    caller selects runs (`run_id=` for the loader, `--run-id` for the CLI), for the hint."""
    first: dict[tuple[str, str], Shard] = {}
    for shard in shards:
        first.setdefault((shard.run_date, shard.run_id), shard)
    if len(first) < 2:
        return
    groups: dict[Signature, list[Shard]] = {}
    for shard in first.values():
        groups.setdefault(run_signature(reader, shard), []).append(shard)
    if len(groups) == 1:
        return
    lines = []
    for signature, members in groups.items():
        models = sorted({f"model {s.model_id} (sha256 {s.model_sha256[:12]})"
                         for s in members})
        runs = ", ".join(f"{s.run_id} ({s.run_date})" for s in members)
        lines.append(f"  {' / '.join(models)}: {describe(signature)}: runs {runs}")
    example = [s.run_id for s in next(iter(groups.values()))]
    raise UserError(
        f"the selected runs under {root} were written by models of different shapes, whose "
        "steps cannot share a batch:\n" + "\n".join(lines) + "\nselect the runs of one "
        f"model, e.g. {_selection(option, example)}")


def _selection(option: str, run_ids: list[str]) -> str:
    if option.endswith("="):
        return f"{option}{run_ids!r}"
    return " ".join(f"{option} {r}" for r in run_ids)
