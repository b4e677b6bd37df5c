"""A checkpoint's config is held to sane limits and to its weights file before any tensor is
allocated: a damaged or hostile config.json gives a clear error at once, never a process
that grows until the machine runs out of memory.

The loads run in a child process with an address-space limit and a deadline, so a loader
that does allocate fails the test instead of the machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workers.wham import CheckpointError, load_model, random_model, save_native
from workers.wham.checkpoints.native import CONFIG_FILE
from workers.wham.config import (
    MAX_IMAGE_SIDE,
    MAX_LAYERS,
    PRESETS,
    GPTConfig,
    WHAMConfig,
    check_tokenizer,
)
from workers.wham.tokenizers import TamingConfig

REPO = Path(__file__).resolve().parents[2]
#: Address space the child may use: torch itself takes about 0.7 GB.
CHILD_BYTES = 3 * 2**30
CHILD_TIMEOUT_S = 150

_LOAD_EACH = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from workers.wham import load_model
out = {{}}
for folder in sys.argv[1:]:
    start = time.monotonic()
    try:
        load_model(folder)
        out[folder] = ["loaded", "", 0.0]
    except BaseException as exc:
        out[folder] = [type(exc).__name__, str(exc)[:400], time.monotonic() - start]
print(json.dumps(out))
"""


def _edited(tmp_path: Path, name: str, preset: str, edit: dict) -> str:
    """A native folder of `preset` whose config.json has the `edit` ("gpt.n_layer": v)."""
    folder = save_native(random_model(preset), tmp_path / name)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    for path, value in edit.items():
        section, field = path.split(".")
        meta[section][field] = value
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    return str(folder)


HOSTILE = {
    "layers": ("tiny", {"gpt.n_layer": 1_000_000}, "gpt.n_layer=1000000 is beyond the limit"),
    "vocab": ("tiny", {"gpt.vocab_size": 10**9}, "gpt.vocab_size=1000000000 is beyond"),
    "width": ("tiny", {"gpt.n_embd": 2**20}, "gpt.n_embd=1048576 is beyond"),
    "window": ("tiny", {"gpt.block_size": 10**9}, "gpt.block_size=1000000000 is beyond"),
    "taming-image": ("tiny", {"tokenizer.image_size": [100_000, 100_000]},
                     r"tokenizer.image_size=\(100000, 100000\): expected \(H, W\) of at most"),
    "vit-image": ("tiny-vit", {"tokenizer.image_size": [100_000, 100_000]},
                  r"tokenizer.image_size=\(100000, 100000\)"),
    "vit-layers": ("tiny-vit", {"tokenizer.num_layers": 10**7},
                   "tokenizer.num_layers=10000000 is beyond"),
    # within the limits, but not the model the weights are
    "one-more-layer": ("tiny", {"gpt.n_layer": 3},
                       r"weights do not match the model config \(it describes [\d,]+ "
                       r"parameters, the weights hold [\d,]+\): missing \['gpt.transformer.h.2"),
}


def _official_with_vocab(path: Path, vocab: int) -> str:
    """An official .ckpt of the tiny model whose embedding tables claim `vocab` rows: a
    strided view of one stored number, so the file stays small while its shapes say 10^9."""
    model = random_model("tiny")
    state = {f"predictor.gpt_model.{k}": v for k, v in model.gpt.state_dict().items()
             if k != "lm_head.weight"}
    state.update({f"context_encoders.images.{k}": v
                  for k, v in model.tokenizer.state_dict().items()})
    n_embd = model.config.gpt.n_embd
    state["predictor.gpt_model.transformer.wte.weight"] = torch.zeros(1).expand(vocab, n_embd)
    codes = model.config.tokenizer.embed_dim
    state["context_encoders.images.vq_model.quantize.embedding.weight"] = (
        torch.zeros(1).expand(vocab - 68, codes))
    tok = model.config.tokenizer
    hparams = {"predictor": {"model_size": "tiny"},
               "images": {"taming_n_embed": vocab - 68,
                          "taming_ddconfig": {"resolution": tok.image_size[0], "ch": tok.ch,
                                              "ch_mult": list(tok.ch_mult),
                                              "num_res_blocks": tok.num_res_blocks,
                                              "attn_resolutions": list(tok.attn_resolutions),
                                              "z_channels": tok.z_channels}}}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    return str(path)


def test_hostile_configs_are_refused_before_anything_is_allocated(tmp_path):
    folders = {name: _edited(tmp_path, name, preset, edit)
               for name, (preset, edit, _) in HOSTILE.items()}
    folders["official-vocab"] = _official_with_vocab(tmp_path / "vocab.ckpt", 10**9 + 68)
    child = subprocess.run(
        [sys.executable, "-c", _LOAD_EACH.format(limit=CHILD_BYTES), *folders.values()],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=REPO)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout)
    expected = {**HOSTILE, "official-vocab": ("", {}, "tokenizer.n_embed=1000000000 is beyond")}
    for name, (_, _, message) in expected.items():
        kind, text, seconds = results[folders[name]]
        assert kind == "CheckpointError", (name, kind, text)
        assert folders[name] in text, (name, text)  # names the file
        assert seconds < 30, (name, seconds)  # a loaded machine; the old loader never ended
        assert re.search(message, text), (name, text)


def test_limits_hold_for_every_config_built():
    with pytest.raises(CheckpointError, match=f"gpt.n_layer=1000 is beyond the limit of "
                       f"{MAX_LAYERS}"):
        GPTConfig(n_layer=1000, n_head=2, n_embd=32, vocab_size=100, block_size=10)
    with pytest.raises(CheckpointError, match="GPTConfig.n_head must be a positive integer"):
        GPTConfig(n_layer=1, n_head=True, n_embd=32, vocab_size=100, block_size=10)
    tiny = PRESETS["tiny-vit"]
    side = MAX_IMAGE_SIDE + 1
    with pytest.raises(CheckpointError, match=f"at most {MAX_IMAGE_SIDE} pixels per side"):
        WHAMConfig(gpt=tiny.gpt, tokenizer=type(tiny.tokenizer)(
            image_size=(10, side), patch_size=4, transf_dim=32, embedding_dim=8,
            num_layers=1, head_size=16, vocab_size=64))
    for preset in PRESETS.values():  # every shipped size is within the limits
        WHAMConfig(gpt=preset.gpt, tokenizer=preset.tokenizer, seq_len=preset.seq_len)


def test_a_damaged_config_value_is_named_not_a_traceback(tmp_path):
    for name, edit, message in (
            ("zero-heads", {"tokenizer.head_size": 0}, "bad model config"),
            ("inf", {"tokenizer.patch_size": 1e400},
             "tokenizer.patch_size=inf: expected positive integers")):
        folder = _edited(tmp_path, name, "tiny-vit", edit)
        with pytest.raises(CheckpointError, match=message):
            load_model(folder)
    big = save_native(random_model("tiny"), tmp_path / "big")
    (big / CONFIG_FILE).write_bytes(b" " * (2 << 20) + b"{}")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="config.json: larger than"):
        load_model(big)
    assert time.monotonic() - start < 5


def test_a_tokenizer_level_without_res_blocks_is_within_the_limits() -> None:
    """The shipped demo model's tokenizer has num_res_blocks=0: a shape, not a damaged one."""
    check_tokenizer(TamingConfig(image_size=(32, 32), n_embed=256, embed_dim=16, ch=32,
                                 ch_mult=(1, 1, 1, 1), num_res_blocks=0, attn_resolutions=(),
                                 z_channels=32))
    with pytest.raises(CheckpointError, match=r"num_res_blocks=-1: expected integers >= 0"):
        check_tokenizer(TamingConfig(image_size=(32, 32), n_embed=256, embed_dim=16, ch=32,
                                     ch_mult=(1, 1, 1, 1), num_res_blocks=-1,
                                     attn_resolutions=(), z_channels=32))
