"""Hostile inputs that other test files do not already try (docs/reliability.md lists which
file covers each kind): fuzzed job YAML through `wham-batch validate`, odd seed files and
names, wrong-width actions, and checkpoints that lie about their tensors or try to run code.

Every case must end in a clear error naming the field or file -- never a traceback, never
code executed.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from support.faultproxy import record_figures

from pipeline.cli import main as cli_main
from pipeline.contracts.errors import UserError
from pipeline.contracts.sources import SeedError
from pipeline.contracts.storage import validate_key
from pipeline.driver.discovery import discover_seeds
from workers.actor.inputs import load_seed

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
VALID = {
    "run": {"name": "fuzz", "run_date": "2026-01-01", "seed": 1},
    "model": {"preset": "tiny"},
    "seeds": {"source": "seeds/"},
    "rollouts": {"steps": 4, "per_seed": 2, "actions": {"kind": "random"}},
    "resources": {"actors": 1, "batch_size": 2},
    "output": {"root": "out/"},
}
_SECTIONS = tuple(VALID)
_FIGURES: dict[str, int] = {"yaml_cases": 0, "yaml_rejected": 0}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["auto", "../../etc", "s3://", "{date}", "cuda", "images", "1e309",
                     "\u202e", "x" * 300, "s3://user:pw@bucket/p"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


def _validate(config: Path, capsys: pytest.CaptureFixture[str], *extra: str
              ) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["validate", str(config), *extra])
    err = capsys.readouterr().err
    _FIGURES["yaml_cases"] += 1
    _FIGURES["yaml_rejected"] += code == 2
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and len(err) < 20_000
    return code, err


@FUZZ
@given(section=st.sampled_from(_SECTIONS), field=st.text(min_size=1, max_size=12),
       pick=st.integers(min_value=0), value=values, drop=st.booleans())
def test_fuzzed_fields_fail_cleanly_naming_the_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, field: str,
        pick: int, value: Any, drop: bool) -> None:
    data = json.loads(json.dumps(VALID))
    known = sorted(data[section])
    if pick % 3 and known:  # mostly a known field, sometimes an unknown one
        field = known[pick % len(known)]
    if drop and field in data[section]:
        del data[section][field]
    else:
        data[section][field] = value
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    code, err = _validate(config, capsys, "--no-path-check")  # the fields, not the files
    if code == 2:
        assert section in err, err  # the message names the section (and the field path)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(
    lambda b: b.decode("latin-1"))))
def test_fuzzed_files_never_raise(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  text: str) -> None:
    config = tmp_path / "job.yaml"
    config.write_bytes(text.encode("utf-8", "surrogatepass"))
    code, err = _validate(config, capsys)
    assert code == 2  # nothing that short is a whole job


@FUZZ
@given(key=st.text(max_size=20), value=st.text(max_size=20))
def test_fuzzed_set_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              key: str, value: str) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(VALID))
    _validate(config, capsys, "--set", f"{key}={value}")


def test_yaml_that_expands_or_nests_deeply(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # aliases nine deep (a "billion laughs" document) and a 500-deep nesting
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, "
        f"*a{i-1}, *a{i-1}]\n" for i in range(1, 9)) + "run: *a8\n"
    (tmp_path / "laughs.yaml").write_text(laughs)
    code, err = _validate(tmp_path / "laughs.yaml", capsys)
    assert code == 2 and "run" in err
    (tmp_path / "deep.yaml").write_text("run: " + "[" * 500 + "]" * 500 + "\n")
    code, err = _validate(tmp_path / "deep.yaml", capsys)
    assert code == 2
    record_figures("hostile_yaml", **_FIGURES)


# ---------------------------------------------------------------- seeds


def _png16_rgb(h: int, w: int) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    raw = b"".join(b"\0" + np.full((w, 3), 0x8000, ">u2").tobytes() for _ in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _image(mode: str, fmt: str, size: tuple[int, int] = (8, 8), **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_seed_files_that_other_tests_do_not_try(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    gif = io.BytesIO()
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    good = {
        "rgb16.png": _png16_rgb(6, 6),
        "jpeg_named.png": _image("RGB", "JPEG"),  # the content decides, not the suffix
        "tiff_named.png": _image("RGB", "TIFF"),
        "cmyk_named.png": _image("CMYK", "JPEG"),
        "animated_gif.png": gif.getvalue(),  # a GIF, three frames
        "wide.png": _image("RGB", "PNG", size=(4000, 1)),
        "日本語の画像.png": _image("RGB", "PNG"),
        "e\u0301cole.png": _image("RGB", "PNG"),  # NFD
        "\u00e9cole.png": _image("RGB", "PNG"),  # NFC: must not collide with the NFD one
        "\u202eevil.png": _image("RGB", "PNG"),  # right-to-left override
    }
    bad = {
        "zero_bytes_idat.png": _png16_rgb(6, 6)[:33] + b"\0\0\0\0IDAT\x35\xaf\x06\x1e",
        "eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(x) run\n",
        "svg.png": b"<svg xmlns='http://www.w3.org/2000/svg'><script>x</script></svg>",
    }
    for name, data in {**good, **bad}.items():
        (seeds / name).write_bytes(data)
    refs = discover_seeds(str(seeds), format="images")
    ids = [r.seed_id for r in refs]
    assert len(set(ids)) == len(ids) == len(good) + len(bad)
    for ref in refs:
        validate_key(ref.seed_id)  # every id is a safe single key segment
        assert "/" not in ref.seed_id and "\u202e" not in ref.seed_id
    rejected = 0
    for ref in refs:
        name = Path(ref.uri).name
        if name in bad:
            with pytest.raises(SeedError) as info:
                load_seed(ref, image_size=(8, 8), context_steps=1)
            assert ref.seed_id in str(info.value)
            assert "Ghostscript" not in str(info.value)  # EPS never reaches an interpreter
            rejected += 1
        else:
            seed = load_seed(ref, image_size=(8, 8), context_steps=1)
            assert seed.context_images.shape == (1, 3, 8, 8)
            assert seed.context_images.dtype == np.uint8
    record_figures("hostile_seeds", tried=len(refs), rejected=rejected,
                   loaded=len(refs) - rejected)


def _clip(actions: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((len(actions), 3, 4, 4), np.uint8), actions=actions)
    return buf.getvalue()


@pytest.mark.parametrize("name, actions, match", [
    ("narrow", np.zeros((4, 15), np.int64), "16"),
    ("wide", np.zeros((4, 17), np.int64), "16"),
    ("nan", np.full((4, 16), np.nan), "actions"),
    ("negative", np.full((4, 16), -1, np.int64), "actions"),
])
def test_clip_actions_of_the_wrong_width_or_value(tmp_path: Path, name: str,
                                                  actions: np.ndarray, match: str) -> None:
    (tmp_path / f"{name}.npz").write_bytes(_clip(actions))
    (ref,) = discover_seeds(str(tmp_path), format="wham-npz")
    with pytest.raises(SeedError, match=match) as info:
        load_seed(ref, image_size=(4, 4), context_steps=2)
    assert name in str(info.value)
    record_figures("hostile_clip_actions", tried=1, rejected=1)


@pytest.mark.parametrize("value", [[0] * 15, [0] * 17, [0] * 12 + [float("nan")] * 4,
                                   [0] * 12 + [2.0, 0, 0, 0], [2] + [0] * 15])
def test_constant_actions_of_the_wrong_width_or_value(tmp_path: Path, value: list,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    data = json.loads(json.dumps(VALID))
    data["rollouts"]["actions"] = {"kind": "constant", "value": value}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    code, err = _validate(config, capsys)
    assert code == 2 and "rollouts.actions" in err
    record_figures("hostile_constant_actions", tried=1, rejected=1)


def test_action_script_with_extra_or_duplicate_columns(tmp_path: Path) -> None:
    from pipeline.driver.discovery import load_action_script
    from workers.wham.actions import ACTION_NAMES

    header = ",".join(ACTION_NAMES)
    (tmp_path / "dup.csv").write_text(f"{header},button_A\n" + ",".join(["0"] * 17) + "\n")
    with pytest.raises(UserError, match="dup.csv"):
        load_action_script(str(tmp_path / "dup.csv"))
    (tmp_path / "inf.csv").write_text(header + "\n" + ",".join(["0"] * 12 + ["inf"] * 4) + "\n")
    with pytest.raises(UserError, match="inf.csv"):
        load_action_script(str(tmp_path / "inf.csv"))
    record_figures("hostile_action_scripts", tried=2, rejected=2)


# ---------------------------------------------------------------- checkpoints


def test_safetensors_with_mismatched_or_lying_shapes(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from workers.wham import CheckpointError, load_model, random_model, save_native

    folder = save_native(random_model("tiny"), tmp_path / "native")
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if k.endswith("wte.weight"))
    # one tensor one row short
    save_file({**tensors, name: tensors[name][:-1].contiguous()}, weights)
    with pytest.raises(CheckpointError, match="model.safetensors|config") as info:
        load_model(folder)
    assert "wte" in str(info.value) or "match" in str(info.value)
    # a header that claims more bytes than the file holds
    save_file(tensors, weights)
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = [10**6, 10**6]
    body = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + length:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)
    # a header length pointing past the end of the file
    weights.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)
    record_figures("hostile_safetensors", tried=3, rejected=3)


class _Popen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import subprocess

        return (subprocess.Popen, (["touch", str(self.marker)],))


class _ImportThenCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (__import__("builtins").exec,
                (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


@pytest.mark.parametrize("payload", [_Popen, _ImportThenCall])
def test_more_code_executing_pickles_never_run(tmp_path: Path, payload: type) -> None:
    import pickle
    import zipfile

    from workers.wham import CheckpointError, load_model

    marker = tmp_path / "pwned"

    blob = pickle.dumps({"state_dict": {}, "hyper_parameters": payload(marker)}, protocol=2)
    ckpt = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(ckpt, "w") as zf:
        zf.writestr("archive/data.pkl", blob)
        zf.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_model(ckpt)
    assert not marker.exists()
    record_figures("hostile_pickles", tried=1, rejected=1, executed=0)
