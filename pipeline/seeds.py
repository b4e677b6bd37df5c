"""Seeds: finding them (driver side) and loading them (actor side).

A seed is what a rollout starts from: one picture (`images` format), a recorded clip
(`wham-npz`: the official sample-data `.npz` files with `images` uint8 (T,3,H,W) and
`actions` (T,16) in model form), or either of those listed in a `manifest` (CSV or
Parquet with a `uri` column and an optional `seed_id` column).

Discovery only lists names, so the driver stays light; `load_seed` reads and decodes inside
the actor. Seeds are untrusted input:
- `.npz` files load with `allow_pickle=False` and a bound on the uncompressed array size;
- images larger than Pillow's `Image.MAX_IMAGE_PIXELS` are an error (Pillow only warns
  between 1x and 2x that limit), as are truncated or unreadable files;
- a symlink that leads out of the seed folder is refused;
- seed ids are safe key segments (`storage.safe_segment`).

Frames whose size differs from the model's are resized with Lanczos to exactly (H, W) (the
aspect ratio is not kept: seeds are expected to be game frames of the model's shape).
Grey, palette, CMYK and 16-bit grey images are converted to RGB; alpha is dropped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import UserError
from pipeline.storage import open_storage, read_uri, safe_segment

if TYPE_CHECKING:
    from PIL import Image

FORMATS = ("images", "wham-npz", "manifest")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Pillow decoders a seed image may use (the file's content decides, not its name).
SEED_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
#: Largest uncompressed array read from one `.npz` member (guards against zip bombs).
MAX_CLIP_BYTES = 2 * 1024**3


class SeedError(UserError):
    """A seed that cannot be used; the message names the seed."""


@dataclass(frozen=True, slots=True)
class SeedRef:
    """A discovered seed: a safe id and where to read it.

    `root` is the folder or prefix the seed must stay inside (set by discovery for the
    `images` and `wham-npz` formats; None for manifest rows, which name files explicitly).
    """

    seed_id: str
    uri: str
    root: str | None = None


@dataclass(frozen=True, slots=True)
class SeedData:
    """A loaded seed, already at the model's image size."""

    seed_id: str
    uri: str
    context_images: np.ndarray  # uint8 (T,3,H,W)
    context_actions: np.ndarray | None  # int64 (T,16); None for single pictures
    future_images: np.ndarray | None  # uint8 (R,3,H,W): recorded frames after the context
    future_actions: np.ndarray | None  # int64 (R,16): recorded actions after the context
    source_size: tuple[int, int]  # (H, W) before resizing


# ---------------------------------------------------------------------------- discovery


def _default_patterns(format: str) -> tuple[str, ...]:
    return ("*.npz",) if format == "wham-npz" else tuple(f"*{ext}" for ext in IMAGE_EXTENSIONS)


def _matches(rel: str, patterns: tuple[str, ...], *, case_sensitive: bool) -> bool:
    name = rel if case_sensitive else rel.lower()
    return any(fnmatch.fnmatchcase(name, p if case_sensitive else p.lower()) for p in patterns)


def _list_relative(source: str, *, endpoint_url: str | None, region: str | None) -> list[str]:
    """Sorted relative names of the files under a folder or prefix, hidden ones skipped."""
    if not source.startswith("s3://") and not Path(source).is_dir():
        raise UserError(f"seeds.source: {source} is not a folder")
    names = open_storage(source, endpoint_url=endpoint_url, region=region).list_keys()
    return [n for n in names if not any(p.startswith(".") for p in n.split("/"))]


def _ids_for(stems: list[str], names: list[str]) -> list[str]:
    """Seed ids from names without extension, made safe; stems that clash (a.png, a.jpg)
    get a hash of their full name appended."""
    counts = Counter(stems)
    ids = []
    for name, stem in zip(names, stems, strict=True):
        if counts[stem] > 1:
            digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4)
            ids.append(safe_segment(f"{safe_segment(stem)}-{digest.hexdigest()}"))
        else:
            ids.append(safe_segment(stem))
    return ids


def _stem(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(""))


def _join_uri(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if root.startswith("s3://") else str(Path(root) / rel)


def read_table_file(
    uri: str,
    *,
    what: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    string_columns: tuple[str, ...] = (),
) -> Any:
    """A small CSV or Parquet file (local or s3://) as a pyarrow Table.

    `what` starts every error message (e.g. "action script"); `string_columns` are read
    as strings from CSV whatever they look like.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        data = read_uri(uri, endpoint_url=endpoint_url, region=region)
    except FileNotFoundError:
        raise UserError(f"{what} {uri} does not exist") from None
    try:
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(data))
        elif uri.lower().endswith(".csv"):
            types = dict.fromkeys(string_columns, pa.string())
            options = pacsv.ConvertOptions(column_types=types)
            table = pacsv.read_csv(pa.BufferReader(data), convert_options=options)
        else:
            raise UserError(f"{what} {uri} must be a .csv or .parquet file")
    except pa.ArrowException as exc:
        raise UserError(f"{what} {uri} cannot be read ({exc})") from None
    names = table.column_names
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # pyarrow cannot pick a column by a name that appears twice
        raise UserError(f"{what} {uri}: column(s) {', '.join(repeated)} appear more than once")
    return table


def _read_manifest(source: str, *, endpoint_url: str | None, region: str | None) -> list[SeedRef]:
    table = read_table_file(
        source,
        what="seeds.source: manifest",
        endpoint_url=endpoint_url,
        region=region,
        string_columns=("uri", "seed_id"),
    )
    if "uri" not in table.column_names:
        raise UserError(
            f"seeds.source: manifest {source} has no 'uri' column "
            f"(columns: {', '.join(table.column_names)})"
        )
    uris = table.column("uri").to_pylist()
    given = table.column("seed_id").to_pylist() if "seed_id" in table.column_names else None
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    resolved = []
    for row, uri in enumerate(uris):
        if not isinstance(uri, str) or not uri.strip():
            raise UserError(f"seeds.source: manifest {source} row {row + 1}: empty 'uri'")
        uri = uri.strip()
        if not uri.startswith("s3://") and not os.path.isabs(uri):
            uri = _join_uri(base, uri)  # relative entries are relative to the manifest
        resolved.append(uri)
    derived = _ids_for([PurePosixPath(_stem(u)).name for u in resolved], resolved)
    rows_by_id: dict[str, int] = {}
    refs = []
    for row, uri in enumerate(resolved):
        seed_id = safe_segment(given[row]) if given and given[row] else derived[row]
        if seed_id in rows_by_id:
            raise UserError(
                f"seeds.source: manifest {source} rows {rows_by_id[seed_id] + 1} and {row + 1} "
                f"both give seed id {seed_id!r}; set distinct seed_id values"
            )
        rows_by_id[seed_id] = row
        refs.append(SeedRef(seed_id=seed_id, uri=uri))
    return refs


def discover_seeds(
    source: str,
    *,
    format: str = "images",
    glob: str | None = None,
    limit: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> list[SeedRef]:
    """Find the seeds under `source` (a folder, an s3:// prefix, or a manifest file).

    `glob` selects files by relative name (fnmatch; `*` also crosses '/'); by default
    `*.png`, `*.jpg`, `*.jpeg` (any case) for images and `*.npz` for clips. Results are in
    sorted order of the relative name (manifest: file order); `limit` keeps the first N.
    """
    if format not in FORMATS:
        raise UserError(f"seeds.format {format!r} is not one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise UserError(f"seeds.limit must be at least 1, got {limit}")
    source = os.fspath(source)
    if format == "manifest":
        refs = _read_manifest(source, endpoint_url=endpoint_url, region=region)
        if glob:
            refs = [r for r in refs if _matches(r.uri, (glob,), case_sensitive=True)]
        return refs[:limit]
    root = source.rstrip("/") if source.startswith("s3://") else str(Path(source).absolute())
    if not source.startswith("s3://") and Path(source).is_file():
        names, root = [Path(source).name], str(Path(source).absolute().parent)
    else:
        names = _list_relative(root, endpoint_url=endpoint_url, region=region)
    patterns = (glob,) if glob else _default_patterns(format)
    names = [n for n in names if _matches(n, patterns, case_sensitive=bool(glob))]
    # Ids come from every match before the limit, so a seed's id does not depend on it.
    ids = _ids_for([_stem(n) for n in names], names)
    return [
        SeedRef(seed_id=seed_id, uri=_join_uri(root, name), root=root)
        for seed_id, name in zip(ids, names, strict=True)
    ][:limit]


# ------------------------------------------------------------------------------ loading


def _check_inside_root(ref: SeedRef) -> None:
    if ref.root is None:
        return
    if ref.uri.startswith("s3://") or ref.root.startswith("s3://"):
        if not ref.uri.startswith(ref.root.rstrip("/") + "/"):
            raise SeedError(f"seed {ref.seed_id}: {ref.uri} is not under {ref.root}")
        return
    real = os.path.realpath(ref.uri)
    root = os.path.realpath(ref.root)
    if os.path.commonpath([real, root]) != root:
        raise SeedError(
            f"seed {ref.seed_id}: {ref.uri} leads outside the seed folder {ref.root} "
            "(symlinks out of the seed folder are refused)"
        )


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> uint8 (H,W,3)."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        raise ValueError(f"unsupported image mode {img.mode} (32-bit integer or float pixels)")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _resize(frame_hwc: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h,w,3) -> uint8 (H,W,3) with Lanczos; unchanged when already that size."""
    from PIL import Image

    height, width = size
    if frame_hwc.shape[:2] == (height, width):
        return frame_hwc
    resized = Image.fromarray(frame_hwc, "RGB").resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def _decode_image(data: bytes) -> np.ndarray:
    """Image file bytes -> uint8 (H,W,3); raises for bombs, truncation, non-images."""
    from PIL import Image, ImageOps

    try:
        # Raster formats only: Pillow would hand EPS/PS seeds to Ghostscript if installed.
        img = Image.open(io.BytesIO(data), formats=SEED_IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow raises above 2x its limit
        raise ValueError(str(exc)) from None
    with img:
        # Pillow only warns between 1x and 2x its limit; here the limit itself is the bound.
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise ValueError(
                f"{img.width}x{img.height} pixels exceeds the decompression-bomb limit of "
                f"{limit} pixels"
            )
        img.load()
        return _to_rgb_array(ImageOps.exif_transpose(img))


def _npz_arrays(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (T,H,W,3), actions int64 (T,16) | None) from a clip's bytes."""
    from workers.wham.actions import validate_actions

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if info.file_size > MAX_CLIP_BYTES:
                raise ValueError(
                    f"member {info.filename} would unpack to {info.file_size} bytes "
                    f"(limit {MAX_CLIP_BYTES})"
                )
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if "images" not in npz.files:
            raise ValueError(f"no 'images' array (arrays: {', '.join(npz.files) or 'none'})")
        images = npz["images"]
        actions = npz["actions"] if "actions" in npz.files else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"'images' must be uint8 (T,3,H,W), got {images.dtype} {images.shape}")
    if images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)  # (T,3,H,W) -> (T,H,W,3)
    elif images.shape[-1] != 3:
        raise ValueError(f"'images' must have 3 channels, got shape {images.shape}")
    if len(images) == 0:
        raise ValueError("the clip has no frames")
    if actions is not None:
        actions = validate_actions(actions, name="actions")
        if actions.ndim != 2 or len(actions) != len(images):
            raise ValueError(f"'actions' shape {actions.shape} does not match {len(images)} frames")
    return images, actions


def load_seed(
    ref: SeedRef,
    *,
    image_size: tuple[int, int],
    context_steps: int,
    future_steps: int = 0,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> SeedData:
    """Read and decode one seed at the model's (H, W).

    Pictures give one context frame. Clips give their first `context_steps` frames and
    actions as context (fewer if the clip is shorter) and up to `future_steps` recorded
    frames and actions after them (for replayed actions and policy mode). Every problem
    raises SeedError naming the seed.
    """
    if context_steps < 1:
        raise ValueError(f"context_steps must be >= 1, got {context_steps}")
    _check_inside_root(ref)
    try:
        data = read_uri(ref.uri, endpoint_url=endpoint_url, region=region)
    except FileNotFoundError:
        raise SeedError(f"seed {ref.seed_id}: {ref.uri} does not exist") from None
    except (OSError, UserError) as exc:
        raise SeedError(f"seed {ref.seed_id}: cannot read {ref.uri} ({exc})") from None
    is_clip = ref.uri.lower().endswith(".npz")
    try:
        frames, actions = _npz_arrays(data) if is_clip else (_decode_image(data)[None], None)
    except (OSError, ValueError, SyntaxError, zipfile.BadZipFile) as exc:
        # Pillow reports non-images and truncated files as OSError (UnidentifiedImageError).
        kind = "bad clip" if is_clip else "not a readable image"
        raise SeedError(f"seed {ref.seed_id} ({ref.uri}): {kind}: {exc}") from None
    source_size = (int(frames.shape[1]), int(frames.shape[2]))
    n_ctx = min(context_steps, len(frames))
    end = n_ctx + max(future_steps, 0)
    chw = np.stack([_resize(f, image_size) for f in frames[:end]]).transpose(0, 3, 1, 2)
    chw = np.ascontiguousarray(chw)  # (T,3,H,W)
    with_future = is_clip and future_steps > 0
    return SeedData(
        seed_id=ref.seed_id,
        uri=ref.uri,
        context_images=chw[:n_ctx],
        context_actions=None if actions is None else actions[:n_ctx],
        future_images=chw[n_ctx:] if with_future else None,
        future_actions=actions[n_ctx:end] if with_future and actions is not None else None,
        source_size=source_size,
    )
