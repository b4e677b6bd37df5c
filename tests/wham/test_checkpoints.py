"""Native folders, official Lightning checkpoints (loaded without running pickled code), errors."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch

from workers.wham import CheckpointError, load_model, random_model, save_native
from workers.wham.checkpoints.native import CONFIG_FILE, WEIGHTS_FILE
from workers.wham.config import PRESETS


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


# --- official Lightning checkpoints -------------------------------------------------------

FAKE_MODULE = '''
import os


def _mark(what):
    path = os.environ.get("WHAM_TEST_MARKER")
    if path:
        with open(path, "a") as fh:
            fh.write(what + "\\n")


_mark("imported")


class AttributeDict(dict):
    def __setstate__(self, state):
        _mark("AttributeDict.__setstate__")
        self.__dict__.update(state)


class LightningModuleCreationArgs:
    def __init__(self, pl_class, **pl_kwargs):
        self.pl_class = pl_class
        self.pl_kwargs = pl_kwargs

    def __setstate__(self, state):
        _mark("LightningModuleCreationArgs.__setstate__")
        self.__dict__.update(state)


class GPTTokenPredictor:
    pass


class TamingVQModel:
    pass


class VQGANModel:
    pass
'''


@pytest.fixture
def fake_reference_code(tmp_path, monkeypatch):
    """`humanmodelling.fake_module` on disk: imported for saving, importable during loads.

    Importing it, or restoring its objects, appends to the file named by WHAM_TEST_MARKER.
    """
    import importlib
    import sys

    root = tmp_path / "fake_pkg"
    (root / "humanmodelling").mkdir(parents=True)
    (root / "humanmodelling" / "__init__.py").write_text("")
    (root / "humanmodelling" / "fake_module.py").write_text(FAKE_MODULE)
    monkeypatch.delenv("WHAM_TEST_MARKER", raising=False)
    monkeypatch.syspath_prepend(str(root))
    yield importlib.import_module("humanmodelling.fake_module")
    for name in ("humanmodelling.fake_module", "humanmodelling"):
        sys.modules.pop(name, None)


def _forget_reference_code(monkeypatch, marker) -> None:
    """End the save phase: unload the fake module and arm its marker."""
    import sys

    for name in ("humanmodelling.fake_module", "humanmodelling"):
        sys.modules.pop(name, None)
    monkeypatch.setenv("WHAM_TEST_MARKER", str(marker))


def _hparams(fake, model, *, gpt_spec=True, tok_spec=True):
    cfg = model.config
    predictor = {"model_size": cfg.gpt_size, "seq_len": cfg.seq_len, "nanogpt_version": 1,
                 "bias": True}
    tok = cfg.tokenizer
    if tok.kind == "taming":
        spec = {
            "taming_n_embed": tok.n_embed, "taming_embed_dim": tok.embed_dim,
            "taming_num_indices_per_axis": tok.grid[0],
            "taming_ddconfig": {
                "double_z": tok.double_z, "z_channels": tok.z_channels,
                "resolution": tok.resolution, "in_channels": 3, "out_ch": 3, "ch": tok.ch,
                "ch_mult": list(tok.ch_mult), "num_res_blocks": tok.num_res_blocks,
                "attn_resolutions": list(tok.attn_resolutions), "dropout": 0.0,
            },
        }
        tok_class = fake.TamingVQModel
    else:
        spec = {
            "image_size_per_x_axis": tok.image_size[1], "image_size_per_y_axis": tok.image_size[0],
            "patch_size": tok.patch_size, "transf_dim": tok.transf_dim,
            "embedding_dim": tok.embedding_dim, "num_layers": tok.num_layers,
            "head_size": tok.head_size, "vocab_size": tok.vocab_size,
        }
        tok_class = fake.VQGANModel
    hp = fake.AttributeDict()
    hp["predictor_args"] = fake.LightningModuleCreationArgs(
        fake.GPTTokenPredictor, model_spec=predictor if gpt_spec else {"seq_len": 10})
    hp["context_encoder_args"] = {
        "images": fake.LightningModuleCreationArgs(
            tok_class, model_spec=spec if tok_spec else {}, ckpt_path=None),
    }
    hp["variant"] = {"model_spec": {"bc_loss_only": False}}
    # the kind of harmless objects real hyperparameters carry
    hp["misc"] = {"empty": b"", "raw": b"\x00\x01", "array": np.arange(3), "dtype": torch.float16,
                  "path": PurePosixPath("/data"), "ids": {1, 2},
                  "device": torch.device("cpu"), "pair": (1.5, None)}
    return hp


def _official_state(model) -> dict:
    state = {f"predictor.gpt_model.{k}": v for k, v in model.gpt.state_dict().items()}
    n = model.config.gpt.block_size
    state["predictor.gpt_model.transformer.h.0.attn.bias"] = torch.ones(1, 1, n, n).tril()
    # a tensor with Python-side state is pickled through a different rebuild function
    wpe = state["predictor.gpt_model.transformer.wpe.weight"].clone()
    wpe.note = "python state"
    state["predictor.gpt_model.transformer.wpe.weight"] = wpe
    for key, value in model.tokenizer.state_dict().items():
        state[f"context_encoders.images.{key}"] = value
    if model.config.tokenizer.kind == "vit":
        n = model.tokens_per_image
        state["context_encoders.images.encoder.vit.0.attn.attn_mask"] = torch.ones(
            1, 1, n, n, dtype=torch.bool)
    return state


def _write_official(path, model, hparams, *, state=None) -> None:
    ckpt = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": _official_state(model) if state is None else state,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(7)}}}],
        "hyper_parameters": hparams,
    }
    torch.save(ckpt, path)


@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])
def test_official_checkpoint_loads_without_importing_reference_code(
    tmp_path, monkeypatch, fake_reference_code, preset
):
    import importlib
    import sys

    model = random_model(preset, seed=5)
    ckpt = tmp_path / "WHAM_test.ckpt"
    _write_official(ckpt, model, _hparams(fake_reference_code, model))
    marker = tmp_path / "marker.txt"
    _forget_reference_code(monkeypatch, marker)
    loaded = load_model(ckpt)
    assert "humanmodelling" not in sys.modules
    assert "humanmodelling.fake_module" not in sys.modules
    assert not marker.exists()
    # the marker is live: the module is still importable and importing it fires the marker
    importlib.import_module("humanmodelling.fake_module")
    assert "imported" in marker.read_text()
    assert loaded.model_id == "WHAM_test"
    assert loaded.config == model.config
    assert loaded.sha256 == model.sha256
    _assert_same_weights(model, loaded)
    images = _images(model)
    assert torch.equal(loaded.encode_images(images), model.encode_images(images))


def test_convert_writes_a_native_folder(tmp_path, fake_reference_code):
    from workers.wham import convert_checkpoint

    model = random_model("tiny", seed=2)
    ckpt = tmp_path / "WHAM_small.ckpt"
    _write_official(ckpt, model, _hparams(fake_reference_code, model))
    out = convert_checkpoint(ckpt, tmp_path / "native")
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    native = load_model(out)
    assert native.sha256 == model.sha256 and native.model_id == "WHAM_small"
    _assert_same_weights(model, native)


def test_head_count_falls_back_to_the_size_table(tmp_path, fake_reference_code):
    model = random_model("tiny", seed=2)
    ckpt = tmp_path / "x.ckpt"
    _write_official(ckpt, model, _hparams(fake_reference_code, model, gpt_spec=False))
    loaded = load_model(ckpt)
    assert loaded.config.gpt.n_head == 2 and loaded.config.gpt_size == "tiny"


def test_taming_shape_inferred_from_weights_when_ddconfig_missing(tmp_path, fake_reference_code):
    model = random_model("tiny", seed=2)
    hp = _hparams(fake_reference_code, model)
    del hp["context_encoder_args"]["images"].pl_kwargs["model_spec"]["taming_ddconfig"]
    ckpt = tmp_path / "x.ckpt"
    _write_official(ckpt, model, hp)
    loaded = load_model(ckpt)
    assert loaded.config.tokenizer == model.config.tokenizer
    _assert_same_weights(model, loaded)


@pytest.mark.parametrize("preset,missing", [("tiny", "taming_num_indices_per_axis"),
                                            ("tiny-vit", "image_size_per_y_axis")])
def test_missing_hyperparameters_are_named(tmp_path, fake_reference_code, preset, missing):
    model = random_model(preset)
    ckpt = tmp_path / "x.ckpt"
    _write_official(ckpt, model, _hparams(fake_reference_code, model, tok_spec=False))
    with pytest.raises(CheckpointError, match=f"x.ckpt: cannot tell .*'{missing}'"):
        load_model(ckpt)


def test_missing_or_misshapen_weights_are_named(tmp_path, fake_reference_code):
    model = random_model("tiny")
    hp = _hparams(fake_reference_code, model)
    state = _official_state(model)
    del state["predictor.gpt_model.transformer.h.1.mlp.c_fc.weight"]
    _write_official(tmp_path / "a.ckpt", model, hp, state=state)
    with pytest.raises(CheckpointError, match=r"a.ckpt: .*missing.*h\.1\.mlp\.c_fc\.weight"):
        load_model(tmp_path / "a.ckpt")

    state = _official_state(model)
    key = "context_encoders.images.vq_model.post_quant_conv.weight"
    state[key] = torch.zeros(16, 4, 1, 1)
    _write_official(tmp_path / "b.ckpt", model, hp, state=state)
    with pytest.raises(CheckpointError, match=r"b.ckpt: weight .*post_quant_conv.weight has shape"):
        load_model(tmp_path / "b.ckpt")

    state = {k: v for k, v in _official_state(model).items() if k.startswith("predictor.")}
    _write_official(tmp_path / "c.ckpt", model, hp, state=state)
    with pytest.raises(CheckpointError, match="c.ckpt: no image tokenizer weights"):
        load_model(tmp_path / "c.ckpt")


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsShell, _CallsEval])
def test_code_executing_pickle_is_rejected(tmp_path, payload):
    marker = tmp_path / "pwned"
    model = random_model("tiny")
    ckpt = tmp_path / "evil.ckpt"
    _write_official(ckpt, model, {"evil": payload(marker)})
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.ckpt: refusing to load"):
        load_model(ckpt)
    assert not marker.exists()


class _Builds:
    """Pickles as a call of the builtin container `kind` on `arg`."""

    def __init__(self, kind, arg):
        self.kind, self.arg = kind, arg

    def __reduce__(self):
        return (self.kind, (self.arg,))


# range(10**6) stands in for range(2**40), which loaded for real would exhaust memory.
@pytest.mark.parametrize("kind, arg, given", [(list, range(10**6), "builtins.range"),
                                              (tuple, range(10**6), "builtins.range"),
                                              (set, "abc", "str"),
                                              (frozenset, {"a": 1}, "dict")])
def test_containers_are_built_only_from_what_the_pickle_holds(tmp_path, kind, arg, given):
    model = random_model("tiny")
    ckpt = tmp_path / "bomb.ckpt"
    _write_official(ckpt, model, {"big": _Builds(kind, arg)})
    with pytest.raises(CheckpointError, match=rf"bomb.ckpt: refusing to load: the pickle "
                                              rf"builds a {kind.__name__} from \({given}"):
        load_model(ckpt)


def test_truncated_and_foreign_files_give_clear_errors(tmp_path, fake_reference_code):
    import zipfile

    model = random_model("tiny")
    good = tmp_path / "good.ckpt"
    _write_official(good, model, _hparams(fake_reference_code, model))
    data = good.read_bytes()

    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.ckpt: not a readable PyTorch zip"):
        load_model(tmp_path / "half.ckpt")

    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt"):
        load_model(tmp_path / "empty.ckpt")

    with zipfile.ZipFile(tmp_path / "random.ckpt", "w") as zf:
        zf.writestr("hello.txt", "not a checkpoint")
    with pytest.raises(CheckpointError, match="random.ckpt: zip file without a torch data.pkl"):
        load_model(tmp_path / "random.ckpt")

    (tmp_path / "config.ckpt").write_text(json.dumps({"state_dict": {}}))
    with pytest.raises(CheckpointError, match="config.ckpt: not a readable PyTorch zip"):
        load_model(tmp_path / "config.ckpt")

    folder = save_native(model, tmp_path / "native")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable PyTorch zip"):
        load_model(folder / WEIGHTS_FILE)

    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not a Lightning checkpoint"):
        load_model(tmp_path / "plain.pt")
