"""Reading and writing model files: native folders and official Lightning checkpoints.

The model (`workers.wham.model`) knows nothing of these formats; this package maps them onto
its state-dict keys (`native`, `official`) and never runs pickled code (`safe_pickle`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workers.wham.checkpoints.native import load_native, save_native
from workers.wham.checkpoints.official import load_official
from workers.wham.errors import CheckpointError
from workers.wham.model import WHAMModel


def load_model(
    source: str | os.PathLike, *, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> WHAMModel:
    """Load a native folder (config.json + model.safetensors) or an official Lightning .ckpt."""
    path = Path(source)
    if path.is_dir():
        model = load_native(path)
    elif path.exists():
        model = load_official(path)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    return model.place(device=device, dtype=dtype)


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert an official .ckpt into a native folder; returns the folder."""
    return save_native(load_official(src), out_dir)


__all__ = ["convert_checkpoint", "load_model", "save_native"]
