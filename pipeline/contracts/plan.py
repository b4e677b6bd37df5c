"""Deterministic work units: which rollouts run together, with which rng seeds and names.

The same seeds and the same spec always give the same units with the same ids, so a rerun
of a run id can skip what is already committed and a retried unit overwrites its own files.

A rollout's rng seed mixes `run.seed`, the seed id, the rollout index and, by default
(`run.seed_scope: run`), the run id: two run ids of one config (two nightly dates) generate
different rollouts, and a run id reproduces its own wherever it runs. `seed_scope: config`
leaves the run id out, as every run did before seed scopes existed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from pipeline.contracts.errors import UserError
from pipeline.contracts.layout import rollout_id_for, unit_id_for
from pipeline.contracts.sources import SeedRef
from pipeline.contracts.spec import JobSpec
from pipeline.contracts.storage import safe_segment


@dataclass(frozen=True, slots=True)
class RolloutItem:
    seed_id: str
    seed_uri: str
    rollout_index: int
    rollout_id: str
    rng_seed: int
    seed_root: str | None = None  # folder/prefix the seed must stay inside (SeedRef.root)

    def seed_ref(self) -> SeedRef:
        return SeedRef(seed_id=self.seed_id, uri=self.seed_uri, root=self.seed_root)


@dataclass(frozen=True, slots=True)
class WorkUnit:
    unit_id: str
    index: int
    items: tuple[RolloutItem, ...]
    #: The run's plan fingerprint, recorded in the unit's commit marker (set by the driver).
    plan_fingerprint: str = ""

    @property
    def num_rollouts(self) -> int:
        return len(self.items)


@dataclass(slots=True)
class UnitReceipt:
    """What an actor reports for one unit; the frames themselves went to storage."""

    unit_id: str
    ok: int
    failed: int
    generated_frames: int  # ok rollouts x rollouts.steps
    tokens: int
    generate_seconds: float
    write_seconds: float
    worker: str
    errors: list[str] = field(default_factory=list)
    #: Frames physically stored (PNG objects or rows of the frames part, context included).
    stored_frames: int = 0
    #: How this unit's seeds were made to fit the model, e.g. {"resized 96x64 -> 32x32": 2}
    #: (each seed counted by the unit that holds its first rollout).
    adaptations: dict[str, int] = field(default_factory=dict)


def rng_seed_for(run_seed: int, seed_id: str, rollout_index: int, *,
                 run_id: str | None = None) -> int:
    """A 63-bit seed that depends only on the run seed, the seed id, the rollout index and,
    when given, the run id (None: the config-scoped seed of `run.seed_scope: config`)."""
    text = f"{run_seed}\0{seed_id}\0{rollout_index}"
    if run_id is not None:  # a distinct prefix: never the text of a config-scoped seed
        text = f"run\0{run_id}\0{text}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def make_plan(
    seeds: Iterable[SeedRef], *, run_seed: int, per_seed: int, unit_size: int,
    run_id: str | None = None,
) -> list[WorkUnit]:
    """Units of up to `unit_size` rollouts over the seeds, seed-major; their rng seeds mix in
    `run_id` when given (`rng_seed_for`).

    Seeds are sorted first so discovery order (S3 listing, filesystem) cannot change the
    plan; a seed's rollouts stay next to each other so a unit loads each seed once.
    """
    if per_seed < 1 or unit_size < 1:
        raise ValueError("per_seed and unit_size must be positive")
    items: list[RolloutItem] = []
    seed_of: dict[str, str] = {}  # rollout id -> the uri of its seed
    for seed in sorted(seeds, key=lambda s: (s.seed_id, s.uri)):
        safe = safe_segment(seed.seed_id)
        for r in range(per_seed):
            rollout_id = rollout_id_for(safe, r)
            if rollout_id in seed_of:
                # Shared rollout ids would make two seeds overwrite each other's outputs.
                other = seed_of[rollout_id]
                what = (f"seed {seed.uri} is listed twice" if other == seed.uri else
                        f"seeds {other} and {seed.uri} both get the seed id {safe!r}")
                raise UserError(f"{what}, so their rollouts would share the id {rollout_id!r};"
                                " give every seed its own seed id")
            seed_of[rollout_id] = seed.uri
            items.append(RolloutItem(
                seed_id=seed.seed_id, seed_uri=seed.uri, rollout_index=r,
                rollout_id=rollout_id,
                rng_seed=rng_seed_for(run_seed, seed.seed_id, r, run_id=run_id),
                seed_root=seed.root,
            ))
    return [
        WorkUnit(unit_id=unit_id_for(i), index=i, items=tuple(items[start:start + unit_size]))
        for i, start in enumerate(range(0, len(items), unit_size))
    ]


def check_plan_size(spec: JobSpec, num_seeds: int) -> None:
    """UserError, before any unit is built, when the run would plan more rollouts or
    generated steps than `run.max_rollouts` / `run.max_steps` allow."""
    rollouts = num_seeds * spec.rollouts.per_seed
    steps = rollouts * spec.rollouts.steps
    how = f"{num_seeds} seeds x rollouts.per_seed {spec.rollouts.per_seed}"
    for total, limit, name, what in (
            (rollouts, spec.run.max_rollouts, "max_rollouts", f"rollouts ({how})"),
            (steps, spec.run.max_steps, "max_steps",
             f"generated steps ({how} x rollouts.steps {spec.rollouts.steps})")):
        if total > limit:
            raise UserError(
                f"this run would plan {total} {what}, more than run.{name}={limit}; lower "
                f"rollouts.per_seed or seeds.limit, or raise the cap (--set run.{name}={total})"
                " if you mean it")


def plan_for_spec(spec: JobSpec, seeds: Iterable[SeedRef], *,
                  seed_scope: str | None = None) -> list[WorkUnit]:
    """The spec's units; `seed_scope` (default `run.seed_scope`) says whether their rng seeds
    mix in the run id."""
    scope = seed_scope or spec.run.seed_scope
    return make_plan(
        seeds, run_seed=spec.run.seed, per_seed=spec.rollouts.per_seed,
        unit_size=spec.resources.unit_size(),
        run_id=spec.run.run_id if scope == "run" else None,
    )


def plan_fingerprint(units: Sequence[WorkUnit]) -> str:
    """Hash of every unit's contents: a resumed run must have planned the same units."""
    h = hashlib.sha256()
    for unit in units:
        h.update(json.dumps([unit.unit_id, [asdict(i) for i in unit.items]]).encode())
    return h.hexdigest()


def pending_units(units: Sequence[WorkUnit], committed: set[str]) -> list[WorkUnit]:
    return [u for u in units if u.unit_id not in committed]
