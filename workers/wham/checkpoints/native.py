"""The native model folder, and building a model for its weights (shared with the official
loader).

Format ``FORMAT_VERSION`` 1: ``config.json`` (format name and version, model id, transformer
and tokenizer hyperparameters, weight fingerprint) and ``model.safetensors`` (keys
``gpt.<official GPT name>`` and ``tokenizer.<official tokenizer name>``;
``gpt.lm_head.weight`` is not stored because it is tied to ``gpt.transformer.wte``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from workers.wham.config import MAX_PARAMS, WHAMConfig
from workers.wham.errors import CheckpointError
from workers.wham.model import TIED_KEY, WHAMModel, empty_model, weights_fingerprint

FORMAT_NAME = "wham-batch-native"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: Bytes of config.json read at most (a real one is about 1 KiB).
MAX_CONFIG_BYTES = 1 << 20


class _StoredTensor:
    """One tensor of an open safetensors file: its shape from the header, its values read
    only when materialised (one tensor at a time, into a model already checked)."""

    def __init__(self, handle: Any, key: str) -> None:
        self.handle, self.key = handle, key
        self.shape = tuple(handle.get_slice(key).get_shape())

    def materialize(self) -> torch.Tensor:
        return self.handle.get_tensor(self.key)


def _materialize(value) -> torch.Tensor:
    return value.materialize() if hasattr(value, "materialize") else value


def _params(shapes: dict) -> int:
    return sum(math.prod(value.shape) for key, value in shapes.items() if key != TIED_KEY)


def _check_keys_and_shapes(own: dict, state: dict, *, source: str) -> None:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own) - {TIED_KEY})
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model config (it describes "
            f"{_params(own):,} parameters, the weights hold {_params(state):,}): missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, target in own.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: weight {key} has shape {tuple(state[key].shape)}, "
                f"the config needs {tuple(target.shape)}"
            )


def parameter_shapes(config: WHAMConfig, *, source: str) -> dict[str, torch.Tensor]:
    """The weights a model of ``config`` has, as tensors without storage: their keys and
    shapes, with nothing allocated; CheckpointError past MAX_PARAMS parameters."""
    with torch.device("meta"):
        shell = WHAMModel(config, model_id="").native_state_dict()
    if _params(shell) > MAX_PARAMS:
        raise CheckpointError(f"{source}: the model config describes {_params(shell):,} "
                              f"parameters, beyond the limit of {MAX_PARAMS:,}")
    return shell


def model_for_weights(config: WHAMConfig, state: dict, *, source: str,
                      model_id: str) -> WHAMModel:
    """A model of ``config`` holding the weights ``state``, its fingerprint set.

    The config is within the limits (checked when it was built); here its parameter count,
    keys and shapes must be those of the weights, compared on a model without storage
    before any tensor is allocated. Values are tensors or lazy tensors (with ``.shape`` and
    ``materialize()``), so a large checkpoint is read one tensor at a time. A stored
    ``gpt.lm_head.weight`` must equal the embedding it is tied to. Raises CheckpointError
    naming what is wrong.
    """
    _check_keys_and_shapes(parameter_shapes(config, source=source), state, source=source)
    model = empty_model(config, model_id=model_id)
    own = model.native_state_dict()
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
    return model


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
        with open(config_path, "rb") as fh:
            text = fh.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{config_path}: larger than {MAX_CONFIG_BYTES} bytes, "
                                  "not a model config")
        meta = json.loads(text)
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
        with safe_open(str(weights_path), "pt") as handle:
            state = {key: _StoredTensor(handle, key) for key in handle.keys()}  # noqa: SIM118
            model = model_for_weights(config, state, source=str(weights_path),
                                      model_id=str(meta.get("model_id") or folder.name))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from exc
    expected = meta.get("weights_sha256")
    if expected and expected != model.sha256:
        raise CheckpointError(
            f"{weights_path}: weights fingerprint {model.sha256[:12]}... does not match "
            f"config.json ({str(expected)[:12]}...); the folder is corrupt or mixed"
        )
    return model
