"""Loading the inputs of a rollout inside an actor: seed frames and given actions.

Seeds are untrusted input:
- `.npz` files load with `allow_pickle=False` and a bound on the uncompressed array size;
- images larger than Pillow's `Image.MAX_IMAGE_PIXELS` are an error (Pillow only warns
  between 1x and 2x that limit), as are truncated or unreadable files; only raster formats
  are decoded (Pillow would hand EPS/PS to Ghostscript);
- a symlink that leads out of the seed folder is refused;
- a Demonstrator folder's `actions.json` may only name files in that folder, and only the
  frames a rollout uses are read (every named one must exist).

Frames whose size differs from the model's are resized with Lanczos to exactly (H, W) (the
aspect ratio is not kept: seeds are expected to be game frames of the model's shape).
Grey, palette, CMYK and 16-bit grey images are converted to RGB; alpha is dropped. A loaded
seed says how it was adapted (`SeedData.adapted`), so a run can report it in one line.

Given actions (`make_actions`), all in model form int64 (steps, 16):
- `random`: buttons pressed independently with probability `button_prob`, stick bins uniform
  over 0..10; a function of the rollout's `rng_seed` only, so reruns repeat it exactly, and
  a longer rollout starts with the same actions as a shorter one.
- `constant`: one action every step.
- `file`: the scripted table the driver read (pipeline.driver.discovery.load_action_script).
- `replay`: the recorded actions of the seed clip that follow its context.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.contracts.choices import ACTION_KINDS
from pipeline.contracts.errors import UserError
from pipeline.contracts.sources import (
    DEMONSTRATOR_ACTIONS,
    SeedData,
    SeedError,
    SeedRef,
    constant_action,
    demonstrator_actions,
)
from pipeline.contracts.storage import StorageFatalError, open_storage, read_uri
from workers.wham.actions import ACTION_DIM, NUM_BUTTONS, NUM_STICK_BINS, validate_actions
from workers.wham.errors import InputError

#: Pillow decoders a seed image may use (the file's content decides, not its name).
SEED_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
#: Largest uncompressed array read from one `.npz` member (guards against zip bombs).
MAX_CLIP_BYTES = 2 * 1024**3
DEFAULT_BUTTON_PROB = 0.05


class SeedReadError(SeedError):
    """A seed that could not be read (storage still failing after its retries, access
    refused): its rollouts fail `retryable`, so a rerun reopens their unit and reads it
    again. A seed that is missing, too large or does not decode is a plain SeedError."""

    retryable = True


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
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        raise ValueError(f"unsupported image mode {img.mode} (32-bit integer or float pixels)")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_frame(frame_hwc: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h,w,3) -> uint8 (H,W,3) with Lanczos; unchanged when already that size."""
    height, width = size
    if frame_hwc.shape[:2] == (height, width):
        return frame_hwc
    resized = Image.fromarray(frame_hwc, "RGB").resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def decode_image(data: bytes, *, formats: Sequence[str] = SEED_IMAGE_FORMATS,
                 max_pixels: int | None = None) -> np.ndarray:
    """Image file bytes -> uint8 (H,W,3); raises ValueError or OSError for bombs, truncation
    and non-images. `max_pixels` (default: Pillow's `Image.MAX_IMAGE_PIXELS`) bounds the
    picture before its pixels are decoded."""
    return decode_image_mode(data, formats=formats, max_pixels=max_pixels)[0]


def decode_image_mode(data: bytes, *, formats: Sequence[str] = SEED_IMAGE_FORMATS,
                      max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """`decode_image`, and the Pillow mode the picture had (RGB, RGBA, L, I;16, ...)."""
    try:
        # Raster formats only: Pillow would hand EPS/PS seeds to Ghostscript if installed.
        img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:  # Pillow raises above 2x its limit
        raise ValueError(str(exc)) from None
    except UnidentifiedImageError:  # its message shows the repr of the in-memory file
        raise ValueError(f"the data is none of {', '.join(formats)}") from None
    with img:
        # Pillow only warns between 1x and 2x its limit; here the limit itself is the bound.
        limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        if limit and img.width * img.height > limit:
            raise ValueError(
                f"{img.width}x{img.height} pixels exceeds the decompression-bomb limit of "
                f"{limit} pixels"
            )
        img.load()
        return _to_rgb_array(ImageOps.exif_transpose(img)), img.mode


def _npz_arrays(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (T,H,W,3), actions int64 (T,16) | None) from a clip's bytes."""
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


def _read(ref: SeedRef, uri: str, *, endpoint_url: str | None, region: str | None,
          max_bytes: int | None) -> bytes:
    """One file of a seed; SeedError naming it (SeedReadError when reading it failed)."""
    try:
        return read_uri(uri, endpoint_url=endpoint_url, region=region, max_bytes=max_bytes)
    except FileNotFoundError:
        raise SeedError(f"seed {ref.seed_id}: {uri} does not exist") from None
    except (OSError, StorageFatalError) as exc:  # I/O: a later attempt may read it
        raise SeedReadError(f"seed {ref.seed_id}: cannot read {uri} ({exc})") from None
    except UserError as exc:  # too large, a malformed location: the same next time
        raise SeedError(f"seed {ref.seed_id}: cannot read {uri} ({exc})") from None


@dataclass(frozen=True, slots=True)
class _Frames:
    """A seed as read: its frames uint8 (H,W,3) (a folder's already at the model's size when
    one was given), its recorded actions (clips, folders), and its first frame's own (H, W)
    and Pillow mode."""

    frames: Sequence[np.ndarray]
    actions: np.ndarray | None
    source_size: tuple[int, int]
    mode: str


def _demonstrator_frames(ref: SeedRef, data: bytes, *, count: int,
                         image_size: tuple[int, int] | None, endpoint_url: str | None,
                         region: str | None, max_bytes: int | None) -> _Frames:
    """A Demonstrator folder: its first `count` frames (numeric name order; at `image_size`
    when given) and the actions of all of them. Every image actions.json names must
    exist."""
    names, actions = demonstrator_actions(data, where=f"seed {ref.seed_id}: {ref.uri}")
    folder = ref.uri[:-len(DEMONSTRATOR_ACTIONS)].rstrip("/")
    try:
        present = set(open_storage(folder, endpoint_url=endpoint_url, region=region).list_keys())
    except (OSError, StorageFatalError) as exc:
        raise SeedReadError(f"seed {ref.seed_id}: cannot list {folder} ({exc})") from None
    missing = [name for name in names if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SeedError(f"seed {ref.seed_id}: {folder}/{missing[0]}{more} is named in "
                        f"{ref.uri} but does not exist")
    frames, source_size, first_mode = [], (0, 0), "RGB"
    for name in names[:count]:
        image = SeedRef(seed_id=ref.seed_id, uri=f"{folder}/{name}", root=ref.root)
        _check_inside_root(image)
        raw = _read(image, image.uri, endpoint_url=endpoint_url, region=region,
                    max_bytes=max_bytes)
        try:
            frame, mode = decode_image_mode(raw)
        except (OSError, ValueError, SyntaxError) as exc:
            raise SeedError(f"seed {ref.seed_id} ({image.uri}): not a readable image: "
                            f"{exc}") from None
        if not frames:
            source_size, first_mode = (int(frame.shape[0]), int(frame.shape[1])), mode
        # Resized at once: large frames compress to little, and a folder holds many.
        frames.append(resize_frame(frame, image_size) if image_size else frame)
    return _Frames(frames, actions, source_size, first_mode)


def load_seed(
    ref: SeedRef,
    *,
    image_size: tuple[int, int],
    context_steps: int,
    future_steps: int = 0,
    endpoint_url: str | None = None,
    region: str | None = None,
    max_bytes: int | None = None,
) -> SeedData:
    """Read and decode one seed at the model's (H, W).

    Pictures give one context frame. Clips and Demonstrator folders give their first
    `context_steps` frames and actions as context (fewer if the clip is shorter) and up to
    `future_steps` recorded frames and actions after them (for replayed actions and policy
    mode). A file larger than `max_bytes` is not read. Every problem raises SeedError
    naming the seed and the file (SeedReadError when reading it failed).
    """
    if context_steps < 1:
        raise ValueError(f"context_steps must be >= 1, got {context_steps}")
    n_wanted = context_steps + max(future_steps, 0)
    read = _read_seed(ref, count=n_wanted, image_size=image_size, endpoint_url=endpoint_url,
                      region=region, max_bytes=max_bytes)
    frames, actions, source_size = read.frames, read.actions, read.source_size
    is_folder = ref.uri.rsplit("/", 1)[-1] == DEMONSTRATOR_ACTIONS
    is_clip = ref.uri.lower().endswith(".npz")
    n_ctx = min(context_steps, len(frames))
    end = n_ctx + max(future_steps, 0)
    chw = np.stack([resize_frame(f, image_size) for f in frames[:end]]).transpose(0, 3, 1, 2)
    chw = np.ascontiguousarray(chw)  # (T,3,H,W)
    with_future = (is_clip or is_folder) and future_steps > 0
    return SeedData(
        seed_id=ref.seed_id,
        uri=ref.uri,
        context_images=chw[:n_ctx],
        context_actions=None if actions is None else actions[:n_ctx],
        future_images=chw[n_ctx:] if with_future else None,
        future_actions=actions[n_ctx:end] if with_future and actions is not None else None,
        source_size=source_size,
        adapted=adaptations(source_size=source_size, mode=read.mode, image_size=image_size),
    )


def check_seed(ref: SeedRef, *, endpoint_url: str | None = None, region: str | None = None,
               max_bytes: int | None = None) -> None:
    """Read and decode one seed as `load_seed` does (the driver's preflight samples seeds
    with it); SeedError naming the seed when it cannot be used."""
    _read_seed(ref, count=1, image_size=None, endpoint_url=endpoint_url, region=region,
               max_bytes=max_bytes)


def _read_seed(ref: SeedRef, *, count: int, image_size: tuple[int, int] | None,
               endpoint_url: str | None, region: str | None, max_bytes: int | None) -> _Frames:
    """A seed's frames as `_Frames` (a Demonstrator folder's first `count`); SeedError
    (SeedReadError when reading failed) naming the seed and the file."""
    _check_inside_root(ref)
    data = _read(ref, ref.uri, endpoint_url=endpoint_url, region=region, max_bytes=max_bytes)
    is_clip = ref.uri.lower().endswith(".npz")
    try:
        if ref.uri.rsplit("/", 1)[-1] == DEMONSTRATOR_ACTIONS:
            return _demonstrator_frames(ref, data, count=count, image_size=image_size,
                                        endpoint_url=endpoint_url, region=region,
                                        max_bytes=max_bytes)
        if is_clip:
            frames, actions = _npz_arrays(data)
            mode = "RGB"  # clips are uint8 RGB by their format
        else:
            image, mode = decode_image_mode(data)
            frames, actions = image[None], None
    except (OSError, ValueError, SyntaxError, zipfile.BadZipFile) as exc:
        # Pillow reports truncated files as OSError.
        kind = "bad clip" if is_clip else "not a readable image"
        raise SeedError(f"seed {ref.seed_id} ({ref.uri}): {kind}: {exc}") from None
    return _Frames(frames, actions, (int(frames[0].shape[0]), int(frames[0].shape[1])), mode)


def adaptations(*, source_size: tuple[int, int], mode: str,
                image_size: tuple[int, int]) -> tuple[str, ...]:
    """How a seed of (H, W) `source_size` and Pillow `mode` was made to fit the model's
    (H, W), in words: e.g. ("resized 96x64 -> 32x32", "converted RGBA -> RGB")."""
    out = []
    if tuple(source_size) != tuple(image_size):
        (h, w), (th, tw) = source_size, image_size
        out.append(f"resized {w}x{h} -> {tw}x{th}")
    if mode != "RGB":
        out.append(f"converted {mode} -> RGB")
    return tuple(out)


def make_actions(
    kind: str,
    *,
    steps: int,
    rng_seed: int,
    constant: Sequence[float] | Mapping[str, Any] | np.ndarray | None = None,
    script: np.ndarray | None = None,
    seed: SeedData | None = None,
    button_prob: float = DEFAULT_BUTTON_PROB,
) -> np.ndarray:
    """The given actions of one rollout: int64 (steps, 16) in model form."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if kind == "random":
        if not 0.0 <= button_prob <= 1.0:
            raise UserError(f"button_prob must be in [0, 1], got {button_prob}")
        # One row of uniforms per step, so the first steps do not depend on `steps`.
        uniform = np.random.default_rng(rng_seed).random((steps, ACTION_DIM))  # (steps,16)
        buttons = uniform[:, :NUM_BUTTONS] < button_prob  # (steps,12)
        stick_bins = np.floor(uniform[:, NUM_BUTTONS:] * NUM_STICK_BINS)  # (steps,4) in 0..10
        actions = np.concatenate([buttons, stick_bins], axis=1).astype(np.int64)
    elif kind == "constant":
        if constant is None:
            raise UserError("constant actions need a value")
        if isinstance(constant, np.ndarray) and constant.dtype.kind in "iu":
            one = constant
        else:
            one = constant_action(constant)
        actions = np.tile(one.reshape(1, ACTION_DIM), (steps, 1))
    elif kind == "file":
        if script is None:
            raise UserError("file actions need the loaded action script")
        if len(script) < steps:
            raise UserError(f"the action script has {len(script)} rows; rollouts need {steps}")
        actions = script[:steps]
    elif kind == "replay":
        if seed is None:
            raise UserError("replayed actions need the seed clip")
        have = 0 if seed.future_actions is None else len(seed.future_actions)
        if have < steps:
            raise SeedError(
                f"seed {seed.seed_id} ({seed.uri}): replay needs {steps} recorded "
                f"actions after the context, the clip has {have}"
            )
        actions = seed.future_actions[:steps]
    else:
        raise UserError(f"unknown action source {kind!r}; choose one of {', '.join(ACTION_KINDS)}")
    try:
        return validate_actions(actions, name=f"{kind} actions")
    except InputError as exc:
        raise UserError(str(exc)) from None
