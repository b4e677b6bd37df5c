"""Seed discovery and loading: real files, real PNG/JPEG/npz, a real S3 endpoint."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.contracts.errors import UserError
from pipeline.contracts.sources import SeedError, SeedRef
from pipeline.contracts.storage import open_storage, validate_key
from pipeline.driver.discovery import discover_seeds
from workers.actor.inputs import load_seed

SIZE = (16, 16)


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return buf.getvalue()


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def clip_bytes(t: int = 8, *, h: int = 16, w: int = 16, actions: np.ndarray | None = None) -> bytes:
    rng = np.random.default_rng(t)
    images = rng.integers(0, 256, (t, 3, h, w), dtype=np.uint8)
    if actions is None:
        actions = np.concatenate(
            [rng.integers(0, 2, (t, 12)), rng.integers(0, 11, (t, 4))], axis=1
        ).astype(np.float32)  # the sample data stores model-form actions as floats
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, actions=actions)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge picture."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(params=["local", "s3"])
def seed_root(request: pytest.FixtureRequest, tmp_path):
    """(storage to write seed files into, source URI to discover from)."""
    if request.param == "local":
        root = tmp_path / "seeds"
        root.mkdir()
        return open_storage(str(root)), str(root)
    uri = request.getfixturevalue("s3_bucket") + "/seeds"
    return open_storage(uri), uri


def test_images_discovery_order_ids_and_filters(seed_root):
    storage, source = seed_root
    for name in [
        "b.png",
        "a.jpg",
        "sub/c.PNG",
        "with space.png",
        "ünï.jpeg",
        "notes.txt",
        ".hidden.png",
        "sub/.cache/x.png",
    ]:
        storage.put_bytes(name, png_bytes(rgb(8, 8)))
    refs = discover_seeds(source, format="images")
    assert [r.seed_id for r in refs][:2] == ["a", "b"]
    ids = {r.seed_id for r in refs}
    assert len(refs) == 4 + 1 and len(ids) == 5  # txt and hidden files skipped
    assert "ünï" in ids
    for ref in refs:
        validate_key(ref.seed_id)
        assert "/" not in ref.seed_id and " " not in ref.seed_id
        assert ref.root is not None and ref.uri.startswith(ref.root)
    assert [r.seed_id for r in discover_seeds(source, format="images", limit=2)] == ["a", "b"]
    only = discover_seeds(source, format="images", glob="sub/*")
    assert [r.uri.rsplit("/", 1)[-1] for r in only] == ["c.PNG"]
    assert discover_seeds(source, format="images") == refs  # deterministic


def test_images_load_resize_and_uri(seed_root):
    storage, source = seed_root
    big = rgb(32, 48, seed=3)
    storage.put_bytes("big.png", png_bytes(big))
    storage.put_bytes("exact.png", png_bytes(rgb(16, 16, seed=4)))
    refs = {r.seed_id: r for r in discover_seeds(source, format="images")}
    seed = load_seed(refs["big"], image_size=SIZE, context_steps=4, future_steps=5)
    assert seed.context_images.shape == (1, 3, 16, 16) and seed.context_images.dtype == np.uint8
    assert seed.context_actions is None and seed.future_images is None
    assert seed.source_size == (32, 48)
    expected = np.asarray(Image.fromarray(big).resize((16, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(seed.context_images[0].transpose(1, 2, 0), expected)
    exact = load_seed(refs["exact"], image_size=SIZE, context_steps=1)
    np.testing.assert_array_equal(exact.context_images[0].transpose(1, 2, 0), rgb(16, 16, 4))


def test_stem_collisions_get_distinct_ids(tmp_path):
    for name in ("a.png", "a.jpg", "a_b.png", "a b.png"):
        (tmp_path / name).write_bytes(png_bytes(rgb(4, 4)))
    refs = discover_seeds(str(tmp_path), format="images")
    ids = [r.seed_id for r in refs]
    assert len(set(ids)) == 4 and "a_b" in ids
    # The limit does not change ids (a.jpg keeps its suffix without a.png in the result).
    assert discover_seeds(str(tmp_path), format="images", limit=2) == refs[:2]


@pytest.mark.parametrize(
    "mode, array",
    [
        ("L", np.full((8, 8), 200, np.uint8)),
        ("RGBA", np.full((8, 8, 4), 100, np.uint8)),
        ("LA", np.full((8, 8, 2), 50, np.uint8)),
        (None, np.full((8, 8), 0xABCD, np.uint16)),  # 16-bit grey
    ],
)
def test_other_channel_layouts_become_rgb(tmp_path, mode, array):
    (tmp_path / "x.png").write_bytes(png_bytes(array, mode))
    (ref,) = discover_seeds(str(tmp_path), format="images")
    seed = load_seed(ref, image_size=(8, 8), context_steps=1)
    assert seed.context_images.shape == (1, 3, 8, 8)
    expected = {"L": 200, "RGBA": 100, "LA": 50, None: 0xAB}[mode]
    assert np.all(seed.context_images == expected)


def test_palette_and_cmyk_become_rgb(tmp_path):
    Image.fromarray(rgb(8, 8)).convert("P").save(tmp_path / "p.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    for ref in discover_seeds(str(tmp_path), format="images"):
        seed = load_seed(ref, image_size=(8, 8), context_steps=1)
        assert seed.context_images.shape == (1, 3, 8, 8)


def bad_images() -> dict[str, bytes]:
    good = png_bytes(rgb(16, 16))
    return {
        "text.png": b"this is not an image at all",
        "truncated.png": good[: len(good) // 2],
        "bomb.png": bomb_png(),
        "empty.png": b"",
    }


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_images_raise_seed_error_naming_the_seed(seed_root, name):
    storage, source = seed_root
    storage.put_bytes(name, bad_images()[name])
    storage.put_bytes("good.png", png_bytes(rgb(16, 16)))
    refs = {r.seed_id: r for r in discover_seeds(source, format="images")}
    stem = name.removesuffix(".png")
    with pytest.raises(SeedError) as info:
        load_seed(refs[stem], image_size=SIZE, context_steps=1)
    assert stem in str(info.value) and name in str(info.value)
    assert " object at 0x" not in str(info.value)  # no Python repr of Pillow's file object
    assert load_seed(refs["good"], image_size=SIZE, context_steps=1).context_images.shape[0] == 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "big.png").write_bytes(png_bytes(rgb(12, 12)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 px: only a warning in Pillow
    (ref,) = discover_seeds(str(tmp_path), format="images")
    with pytest.raises(SeedError, match="big"):
        load_seed(ref, image_size=SIZE, context_steps=1)


def test_hostile_file_names(tmp_path):
    for name in ("..evil.png", "x..y.png", "new\nline.png", "-rf.png", "tab\tname.png"):
        (tmp_path / name).write_bytes(png_bytes(rgb(4, 4)))
    refs = discover_seeds(str(tmp_path), format="images")
    assert len(refs) == 4  # '..evil.png' is a hidden file and is skipped
    for ref in refs:
        validate_key(ref.seed_id)
        assert not ref.seed_id.startswith((".", "-"))
        assert load_seed(ref, image_size=(4, 4), context_steps=1).context_images.shape[0] == 1


def test_symlink_out_of_seed_folder_is_refused(tmp_path):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(rgb(4, 4)))
    os.symlink(secret, seeds / "escape.png")
    (seeds / "real.png").write_bytes(png_bytes(rgb(4, 4)))
    os.symlink(seeds / "real.png", seeds / "inside.png")
    refs = {r.seed_id: r for r in discover_seeds(str(seeds), format="images")}
    with pytest.raises(SeedError, match="outside the seed folder"):
        load_seed(refs["escape"], image_size=(4, 4), context_steps=1)
    assert load_seed(refs["inside"], image_size=(4, 4), context_steps=1) is not None
    # A ref pointing outside its root by path is refused too.
    forged = SeedRef(seed_id="x", uri=str(seeds / ".." / "secret.png"), root=str(seeds))
    with pytest.raises(SeedError):
        load_seed(forged, image_size=(4, 4), context_steps=1)


def test_missing_source_and_bad_format(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        discover_seeds(str(tmp_path / "nope"), format="images")
    with pytest.raises(UserError, match="seeds.format"):
        discover_seeds(str(tmp_path), format="video")
    ref = SeedRef(seed_id="gone", uri=str(tmp_path / "gone.png"), root=str(tmp_path))
    with pytest.raises(SeedError, match="gone"):
        load_seed(ref, image_size=SIZE, context_steps=1)


def test_missing_bucket_is_a_user_error(s3_server):
    with pytest.raises(UserError, match="no-such-seed-bucket"):
        discover_seeds("s3://no-such-seed-bucket/seeds", format="images")


# ---------------------------------------------------------------------------- wham-npz


def test_npz_clips_context_and_future(seed_root):
    storage, source = seed_root
    storage.put_bytes("clip_b.npz", clip_bytes(12))
    storage.put_bytes("clip_a.npz", clip_bytes(8, h=20, w=30))
    storage.put_bytes("frame.png", png_bytes(rgb(4, 4)))  # not a clip: ignored
    refs = discover_seeds(source, format="wham-npz")
    assert [r.seed_id for r in refs] == ["clip_a", "clip_b"]
    seed = load_seed(refs[1], image_size=SIZE, context_steps=3, future_steps=5)
    with np.load(io.BytesIO(clip_bytes(12))) as npz:
        images, actions = npz["images"], npz["actions"].astype(np.int64)
    np.testing.assert_array_equal(seed.context_images, images[:3])
    np.testing.assert_array_equal(seed.context_actions, actions[:3])
    np.testing.assert_array_equal(seed.future_images, images[3:8])
    np.testing.assert_array_equal(seed.future_actions, actions[3:8])
    assert seed.context_actions.dtype == np.int64
    resized = load_seed(refs[0], image_size=SIZE, context_steps=10, future_steps=100)
    assert resized.source_size == (20, 30)
    assert resized.context_images.shape == (8, 3, 16, 16)  # a short clip gives what it has
    assert resized.future_images.shape == (0, 3, 16, 16)


def bad_clips() -> dict[str, bytes]:
    buf = io.BytesIO()
    np.savez(buf, images=np.array([object()], dtype=object))
    pickled = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, frames=np.zeros((2, 3, 4, 4), np.uint8))
    no_images = buf.getvalue()
    bad_actions = np.zeros((8, 16), np.int64)
    bad_actions[5, 13] = 11  # left_stick_y bin out of range
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((4, 3, 4, 4), np.uint8), actions=np.zeros((3, 16)))
    mismatch = buf.getvalue()
    return {
        "pickled": pickled,
        "no_images": no_images,
        "bad_actions": clip_bytes(8, actions=bad_actions),
        "mismatch": mismatch,
        "truncated": clip_bytes(8)[:200],
        "not_zip": b"hello",
    }


@pytest.mark.parametrize("name", sorted(bad_clips()))
def test_bad_clips_raise_seed_error(tmp_path, name):
    (tmp_path / f"{name}.npz").write_bytes(bad_clips()[name])
    (ref,) = discover_seeds(str(tmp_path), format="wham-npz")
    with pytest.raises(SeedError, match=name) as info:
        load_seed(ref, image_size=SIZE, context_steps=2)
    if name == "bad_actions":
        assert "left_stick_y" in str(info.value)


# ---------------------------------------------------------------------------- manifest


def test_manifest_csv_and_parquet(tmp_path, s3_bucket):
    local = tmp_path / "pics"
    local.mkdir()
    (local / "x.png").write_bytes(png_bytes(rgb(16, 16, 1)))
    (local / "clip.npz").write_bytes(clip_bytes(6))
    remote = open_storage(s3_bucket)
    remote.put_bytes("far/x.png", png_bytes(rgb(16, 16, 2)))
    rows = {
        "uri": ["pics/x.png", str(local / "clip.npz"), remote.key_uri("far/x.png")],
        "seed_id": ["first", None, None],
    }
    csv = "uri,seed_id\n" + "\n".join(
        f"{u},{s or ''}" for u, s in zip(rows["uri"], rows["seed_id"], strict=True)
    )
    (tmp_path / "m.csv").write_text(csv)
    pq.write_table(pa.table(rows), tmp_path / "m.parquet")
    for manifest in ("m.csv", "m.parquet"):
        refs = discover_seeds(str(tmp_path / manifest), format="manifest")
        assert [r.seed_id for r in refs][0] == "first"
        assert len({r.seed_id for r in refs}) == 3
        assert all(r.root is None for r in refs)
        loaded = [load_seed(r, image_size=SIZE, context_steps=2) for r in refs]
        assert [s.context_images.shape[0] for s in loaded] == [1, 2, 1]
        np.testing.assert_array_equal(
            loaded[2].context_images[0].transpose(1, 2, 0), rgb(16, 16, 2)
        )
    # The manifest itself can live on S3.
    remote.put_bytes("m.parquet", (tmp_path / "m.parquet").read_bytes())
    assert len(discover_seeds(remote.key_uri("m.parquet"), format="manifest", limit=2)) == 2


def test_manifest_errors(tmp_path):
    (tmp_path / "nouri.csv").write_text("path\na.png\n")
    with pytest.raises(UserError, match="no 'uri' column"):
        discover_seeds(str(tmp_path / "nouri.csv"), format="manifest")
    (tmp_path / "dup.csv").write_text("uri,seed_id\na.png,s\nb.png,s\n")
    with pytest.raises(UserError, match="rows 1 and 2"):
        discover_seeds(str(tmp_path / "dup.csv"), format="manifest")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(UserError, match=r"\.csv or \.parquet"):
        discover_seeds(str(tmp_path / "m.json"), format="manifest")
    with pytest.raises(UserError, match="does not exist"):
        discover_seeds(str(tmp_path / "missing.csv"), format="manifest")
    (tmp_path / "same.csv").write_text("uri\na/x.png\nb/x.png\n")
    refs = discover_seeds(str(tmp_path / "same.csv"), format="manifest")
    assert len({r.seed_id for r in refs}) == 2  # same basename, distinct ids
