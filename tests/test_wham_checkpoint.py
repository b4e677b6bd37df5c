"""Native folders, official Lightning checkpoints (loaded without running pickled code), errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workers.wham import CheckpointError, load_model, random_model, save_native
from workers.wham.model import CONFIG_FILE, PRESETS, WEIGHTS_FILE


def _images(model, *, seed: int = 0, batch: int = 2, steps: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, steps, 3, *model.image_size), dtype=np.uint8)


def _assert_same_weights(a, b) -> None:
    sa, sb = a.native_state_dict(), b.native_state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].float().cpu(), sb[key].float().cpu()), key


@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])
def test_random_model_is_deterministic_per_seed(preset):
    a, b = random_model(preset, seed=3), random_model(preset, seed=3)
    c = random_model(preset, seed=4)
    assert a.sha256 == b.sha256 != c.sha256
    _assert_same_weights(a, b)
    assert a.model_id == f"preset:{preset}"
    assert a.tokens_per_step == a.tokens_per_image + 16
    assert a.config.gpt.vocab_size == a.config.tokenizer.vocab_size + 68
    assert a.config.gpt.block_size == 10 * a.tokens_per_step


def test_tiny_preset_shape():
    model = random_model("tiny")
    assert model.image_size == (16, 16) and model.tokens_per_image == 16
    gpt = model.config.gpt
    assert (gpt.n_layer, gpt.n_head, gpt.n_embd) == (2, 2, 32)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32


def test_real_presets_have_published_token_counts():
    assert PRESETS["wham-1.6b"].tokenizer.tokens_per_image == 540
    assert PRESETS["wham-1.6b"].tokens_per_step == 556
    assert PRESETS["wham-1.6b"].gpt.block_size == 5560
    assert PRESETS["wham-200m"].gpt_size == "chinchilla-251M"


@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])
def test_native_round_trip(tmp_path, preset):
    model = random_model(preset, seed=1)
    save_native(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and meta["weights_sha256"] == model.sha256
    loaded = load_model(tmp_path / "m")
    assert loaded.sha256 == model.sha256 and loaded.model_id == model.model_id
    assert loaded.config == model.config
    _assert_same_weights(model, loaded)
    images = _images(model)
    assert torch.equal(loaded.encode_images(images), model.encode_images(images))
    # the tied head survives although it is not stored
    assert loaded.gpt.lm_head.weight.data_ptr() == loaded.gpt.transformer.wte.weight.data_ptr()


def test_native_load_casts_only_the_transformer(tmp_path):
    save_native(random_model("tiny"), tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.tokenizer.parameters())


def test_native_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path / "empty")

    folder = save_native(random_model("tiny"), tmp_path / "ok")
    (folder / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)

    # weights of another shape under the same config
    tiny_vit = save_native(random_model("tiny-vit"), tmp_path / "vit")
    mixed = save_native(random_model("tiny"), tmp_path / "mixed")
    (mixed / WEIGHTS_FILE).write_bytes((tiny_vit / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_model(mixed)

    (mixed / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: unreadable JSON"):
        load_model(mixed)


def test_native_detects_changed_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_native(random_model("tiny"), tmp_path)
    state = load_file(str(folder / WEIGHTS_FILE))
    state["gpt.transformer.wpe.weight"][0, 0] += 1.0
    save_file(state, str(folder / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_model(folder)
