"""Reading one work unit back: its steps rows and its frames, whatever `output.frames` was.

A step's `frame_key` says where its frame is: a PNG object (frames: png), the unit's frames
part (frames: parquet, fetched once per unit), or nowhere (frames: none), in which case the
frame is decoded from the step's image tokens by the model that wrote the run. Decoded
generated frames get the same watermark the stored PNGs carry, so a run reads back with the
same generated pixels in every mode; decoded context frames are the tokenizer's
reconstruction of the seed frame (the seed itself was not stored).

Everything here runs inside data-loader workers and Ray tasks: storage and models are
opened lazily, once per process.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.contracts.parts import check_part
from pipeline.contracts.storage import Storage, open_storage
from pipeline.dataset.index import Shard, Source
from pipeline.driver.run_state import read_json
from pipeline.query.tables import damaged
from workers.actor.encode import encode_png, provenance_text, watermarked
from workers.actor.replica import load_replica

#: Parallel GETs of per-frame PNG objects within one unit.
PNG_READERS = 8
FRAME_FORMATS = ("array", "png")


@dataclass(slots=True)
class RolloutRows:
    """One rollout as read back: its steps rows in step order and, if asked, its frames."""

    run_date: str
    run_id: str
    rollout_id: str
    steps: Any  # pyarrow.Table: the steps columns of this rollout, sorted by step
    frames: list[Any] | None = None  # per step: uint8 (3,H,W) arrays, or PNG bytes


def png_to_array(data: bytes, *, where: str = "a frame") -> np.ndarray:
    """PNG bytes -> uint8 (3,H,W); UserError naming `where` when the bytes are no PNG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise damaged(where, f"not a readable PNG: {exc}") from None


def check_png(data: bytes, *, where: str) -> bytes:
    """`data` if it is a whole PNG (every chunk's CRC checked), else a UserError naming
    `where`: frames passed on as bytes are checked as strictly as decoded ones."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise ValueError(f"a {img.format} image, not a PNG")
            img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise damaged(where, f"not a readable PNG: {exc}") from None
    return data


@dataclass
class UnitReader:
    """Reads shards of one output root. `frames`: "array" (uint8 (3,H,W)), "png" (bytes) or
    None (no frames); `decoder`: the model for runs stored with frames: none (a checkpoint
    path or URI, or a loaded WHAMModel; default: the run's own model, from its manifest)."""

    source: Source
    frames: str | None = "array"
    decoder: Any = None
    device: str = "cpu"
    _pid: int = -1
    _storage: Storage | None = None
    _models: dict[str, Any] = field(default_factory=dict)
    _manifests: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.frames not in (None, *FRAME_FORMATS):
            raise UserError(f"frames must be one of {FRAME_FORMATS} or None, got {self.frames!r}")

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the settings, never open clients or loaded models (except a given one).
        return {"source": self.source, "frames": self.frames, "decoder": self.decoder,
                "device": self.device}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def storage(self) -> Storage:
        if self._storage is None or self._pid != os.getpid():
            s = self.source
            self._storage = open_storage(s.root, endpoint_url=s.endpoint_url, region=s.region)
            self._pid = os.getpid()
        return self._storage

    def open_part(self, key: str) -> Any:
        """The table part at `key`, whole: the one place the readers (loader, exports,
        decode) open a part, so every check of a part applies to all of them."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            data = self.storage.get_bytes(key)
        except FileNotFoundError:
            raise UserError(f"{self.storage.key_uri(key)} is missing (was the unit committed? "
                            "run `wham-batch verify`)") from None
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise damaged(self.storage.key_uri(key), f"not a readable Parquet file: {exc}") \
                from None
        check_part(key, table.schema.metadata, shown=self.storage.key_uri(key))
        return table

    def _png(self, key: str) -> bytes:
        try:
            return self.storage.get_bytes(key)
        except FileNotFoundError:
            raise UserError(f"frame {self.storage.key_uri(key)} is missing; run "
                            "`wham-batch verify`") from None

    def read(self, shard: Shard) -> list[RolloutRows]:
        """The shard's rollouts, in rollout order, each with its steps and frames."""
        import pyarrow.compute as pc

        key = layout.steps_part_key(shard.run_date, shard.run_id, shard.unit_id)
        steps = self.open_part(key)
        wanted = [rollout_id for rollout_id, _, _ in shard.rollouts]
        steps = steps.filter(pc.is_in(steps.column("rollout_id"), value_set=_strings(wanted)))
        steps = steps.sort_by([("rollout_id", "ascending"), ("step", "ascending")])
        out = []
        for rollout_id, count, _ in shard.rollouts:
            rows = steps.filter(pc.equal(steps.column("rollout_id"), rollout_id))
            if rows.num_rows != count:
                raise damaged(self.storage.key_uri(key),
                              f"rollout {rollout_id} has {rows.num_rows} step rows there, its "
                              f"rollouts row says {count}")
            out.append(RolloutRows(shard.run_date, shard.run_id, rollout_id, rows))
        if self.frames is not None:
            self._attach_frames(shard, out)
        return out

    # ------------------------------------------------------------------ frames

    def _attach_frames(self, shard: Shard, rollouts: list[RolloutRows]) -> None:
        keys = [k for r in rollouts for k in r.steps.column("frame_key").to_pylist()]
        if keys and all(k is None for k in keys):
            decoded = layout.frames_part_key(shard.run_date, shard.run_id, shard.unit_id)
            if not self.storage.exists(decoded):  # `wham-batch decode` not run for it
                for r in rollouts:
                    r.frames = self.decode(shard, r, png=self.frames == "png")
                return
            keys = [decoded] * len(keys)
            for r in rollouts:
                r.steps = r.steps.set_column(
                    r.steps.schema.get_field_index("frame_key"), "frame_key",
                    _strings([decoded] * r.steps.num_rows))
        parts = {k for k in keys if k is not None and k.endswith(".parquet")}
        stored = {}
        for key in parts:
            table = self.open_part(key)
            stored.update(zip(zip(table.column("rollout_id").to_pylist(),
                                  table.column("step").to_pylist(), strict=True),
                              table.column("png").to_pylist(), strict=True))
        pngs = [k for k in keys if k is not None and not k.endswith(".parquet")]
        with ThreadPoolExecutor(PNG_READERS) as pool:
            stored.update(zip(pngs, pool.map(self._png, pngs), strict=True))
        for r in rollouts:
            found = []
            for key, step in zip(r.steps.column("frame_key").to_pylist(),
                                 r.steps.column("step").to_pylist(), strict=True):
                data = stored.get((r.rollout_id, step)) if key in parts else stored.get(key)
                where = (f"the frame of {r.rollout_id} step {step} in "
                         f"{self.storage.key_uri(key)}" if key in parts
                         else f"frame {self.storage.key_uri(key)}")
                if data is None:  # only a part can lack a frame: a PNG is fetched or missing
                    raise damaged(self.storage.key_uri(key),
                                  f"it holds no frame for {r.rollout_id} step {step}")
                found.append(png_to_array(data, where=where) if self.frames == "array"
                             else check_png(data, where=where))
            r.frames = found

    def _manifest(self, shard: Shard) -> dict[str, Any]:
        run = (shard.run_date, shard.run_id)
        if run not in self._manifests:
            self._manifests[run] = read_json(self.storage, layout.manifest_key(*run)) or {}
        return self._manifests[run]

    def _model(self, shard: Shard) -> Any:
        model = self._models.get(shard.model_sha256)
        if model is not None:
            return model
        decoder = self.decoder
        if decoder is None or isinstance(decoder, str):
            spec = self._manifest(shard).get("spec") or {}
            m = spec.get("model") or {}
            if decoder is None and not (m.get("checkpoint") or m.get("preset")):
                raise UserError(f"run {shard.run_id} stored only image tokens and its manifest "
                                "names no model: pass decoder=CHECKPOINT to decode its frames")
            decoder = load_replica(
                checkpoint=decoder or m.get("checkpoint"),
                preset=None if decoder else m.get("preset"), device=self.device,
                dtype="float32", seed=int((spec.get("run") or {}).get("seed", 0)),
                endpoint_url=m.get("endpoint_url"), region=m.get("region"))
        if getattr(decoder, "sha256", None) != shard.model_sha256:
            raise UserError(f"run {shard.run_id} was written by the model with sha256 "
                            f"{shard.model_sha256[:12]}..., the decoder has "
                            f"{str(getattr(decoder, 'sha256', None))[:12]}...: pass that model")
        self._models[shard.model_sha256] = decoder
        return decoder

    def decode(self, shard: Shard, r: RolloutRows, *, png: bool) -> list[Any]:
        """A rollout's frames decoded from its image tokens: uint8 (3,H,W) arrays, or the
        PNGs the writer would have stored (provenance text, watermark as the run had it)."""
        tokens = r.steps.column("image_tokens").to_pylist()
        if any(t is None for t in tokens):
            raise UserError(f"run {r.run_id}: rollout {r.rollout_id} stored neither frames nor "
                            "image tokens for every step (schema version 1 runs keep no "
                            "context tokens)")
        model = self._model(shard)
        try:
            images = model.decode_tokens(np.asarray(tokens, dtype=np.int64)[None])[0]  # (T,3,H,W)
        except ValueError as exc:  # the model's InputError too: tokens its writer never made
            key = layout.steps_part_key(shard.run_date, shard.run_id, shard.unit_id)
            raise damaged(self.storage.key_uri(key), f"the image tokens of {r.rollout_id} do "
                          f"not decode with the model that wrote them: {exc}") from None
        spec = self._manifest(shard).get("spec") or {}
        mark = bool((spec.get("output") or {}).get("watermark", True))
        generated = r.steps.column("generated").to_pylist()
        steps = r.steps.column("step").to_pylist()
        out = []
        for image, gen, step in zip(images, generated, steps, strict=True):
            if png:
                text = provenance_text(model_id=str(getattr(model, "model_id", "")),
                                       run_id=r.run_id, rollout_id=r.rollout_id, step=step,
                                       generated=gen)
                out.append(encode_png(image, text=text, watermark=mark and gen))
            else:
                out.append(watermarked(image) if mark and gen else image)
        return out


def _strings(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())
