"""The native model folder, and copying weights into a model (shared with the official loader).

Format ``FORMAT_VERSION`` 1: ``config.json`` (format name and version, model id, transformer
and tokenizer hyperparameters, weight fingerprint) and ``model.safetensors`` (keys
``gpt.<official GPT name>`` and ``tokenizer.<official tokenizer name>``;
``gpt.lm_head.weight`` is not stored because it is tied to ``gpt.transformer.wte``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workers.wham.config import WHAMConfig
from workers.wham.errors import CheckpointError
from workers.wham.model import TIED_KEY, WHAMModel, empty_model, weights_fingerprint

FORMAT_NAME = "wham-batch-native"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _materialize(value) -> torch.Tensor:
    return value.materialize() if hasattr(value, "materialize") else value


def _check_keys_and_shapes(own: dict, state: dict, *, source: str) -> None:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own) - {TIED_KEY})
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model config: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, target in own.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: weight {key} has shape {tuple(state[key].shape)}, "
                f"the config needs {tuple(target.shape)}"
            )


def load_weights(model: WHAMModel, state: dict, *, source: str) -> None:
    """Copy weights into ``model`` (shapes checked) and set its fingerprint.

    Values are tensors or lazy tensors (with ``.shape`` and ``materialize()``), so a large
    checkpoint is read one tensor at a time. A stored ``gpt.lm_head.weight`` must equal the
    embedding it is tied to. Raises CheckpointError naming what is wrong.
    """
    own = model.native_state_dict()
    _check_keys_and_shapes(own, state, source=source)
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(_materialize(state[key]))
        head = model.gpt.lm_head.weight
        if TIED_KEY in state and not torch.equal(_materialize(state[TIED_KEY]).to(head.dtype),
                                                 head):
            raise CheckpointError(
                f"{source}: lm_head.weight differs from transformer.wte.weight; only "
                "tied heads are supported"
            )
    model.sha256 = weights_fingerprint(model.native_state_dict())


def save_native(model: WHAMModel, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.native_state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_id": model.model_id,
        "weights_sha256": weights_fingerprint(state),
        **model.config.to_dict(),
    }
    tmp_weights = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp_weights), metadata={"format": FORMAT_NAME})
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    tmp_config = out / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_config, out / CONFIG_FILE)
    return out


def _read_config(folder: Path) -> dict:
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{folder}: not a native model folder ({path.name} is missing)")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path}: not a {FORMAT_NAME} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    return meta


def load_native(folder: Path) -> WHAMModel:
    """Load a native folder as a float32 CPU model; the stored fingerprint is checked."""
    meta = _read_config(folder)
    config = WHAMConfig.from_dict(meta, source=str(folder / CONFIG_FILE))
    weights_path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from exc
    model = empty_model(config, model_id=str(meta.get("model_id") or folder.name))
    load_weights(model, state, source=str(weights_path))
    expected = meta.get("weights_sha256")
    if expected and expected != model.sha256:
        raise CheckpointError(
            f"{weights_path}: weights fingerprint {model.sha256[:12]}... does not match "
            f"config.json ({str(expected)[:12]}...); the folder is corrupt or mixed"
        )
    return model
