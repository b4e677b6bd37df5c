"""WHAMModel: an image tokenizer plus the GPT, random initialisation and the weight fingerprint.

The model knows nothing of file formats: `workers.wham.checkpoints` reads and writes them and
copies weights in through `load_weights`.

``sha256`` is a canonical fingerprint of the weights: SHA-256 over the tensors sorted by
state-dict key (``gpt.<official GPT name>``, ``tokenizer.<official tokenizer name>``, the tied
``gpt.lm_head.weight`` left out), each contributing its key, dtype, shape and raw
little-endian bytes, computed on the weights as loaded from the source (floating tensors
hashed as float32, before any ``dtype`` cast). A converted checkpoint and the native folder
written from it therefore share a fingerprint.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from workers.wham.config import PRESETS, WHAMConfig
from workers.wham.errors import CheckpointError
from workers.wham.gpt import GPT
from workers.wham.tokenizers import build_tokenizer

TIED_KEY = "gpt.lm_head.weight"


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Canonical SHA-256 over (key, dtype, shape, bytes) of every tensor, sorted by key.

    Floating tensors are hashed as float32, so the fingerprint does not depend on the dtype
    the weights were stored in, only on their values.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu")
        t = (t.float() if t.is_floating_point() else t).contiguous()
        digest.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class WHAMModel(nn.Module):
    """The WHAM world model: ``tokenizer`` (image <-> tokens) and ``gpt`` (the transformer).

    The tokenizer always runs in float32 (it is small next to the GPT and the reference
    quantises in float32); ``dtype`` is the GPT's dtype.
    """

    def __init__(self, config: WHAMConfig, *, model_id: str) -> None:
        super().__init__()
        self.config = config
        self.model_id = model_id
        self.tokenizer = build_tokenizer(config.tokenizer)
        self.gpt = GPT(config.gpt)
        self.sha256 = ""

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.tokenizer.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokenizer.tokens_per_image

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of an image's tokens, in raster order (18 x 30 on WHAM 1.6B)."""
        return self.config.tokenizer.grid

    @property
    def tokens_per_step(self) -> int:
        return self.config.tokens_per_step

    @property
    def image_vocab_size(self) -> int:
        return self.config.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        """Steps the transformer's position table holds (10 for the released models)."""
        return self.gpt.config.block_size // self.tokens_per_step

    @property
    def device(self) -> torch.device:
        return self.gpt.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.transformer.wte.weight.dtype

    def encode_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B, T, 3, H, W) -> LongTensor (B, T, tokens_per_image) on ``device``."""
        return self.tokenizer.encode(images)

    def decode_tokens(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """Image tokens (B, T, n) -> uint8 ndarray (B, T, 3, H, W) on the CPU."""
        return self.tokenizer.decode(tokens).cpu().numpy()

    def native_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under their state-dict keys, without the tied head."""
        state = self.state_dict()
        state.pop(TIED_KEY, None)
        return state

    def place(self, *, device: torch.device | str, dtype: torch.dtype | None) -> WHAMModel:
        """Move to ``device``; cast the GPT (only) to ``dtype`` when given."""
        self.tokenizer.to(device=device, dtype=torch.float32)
        if dtype is None:
            self.gpt.to(device=device)
        else:
            self.gpt.to(device=device, dtype=dtype)
        return self.eval()


def empty_model(config: WHAMConfig, *, model_id: str) -> WHAMModel:
    """A CPU model with uninitialised weights, for loaders that overwrite every weight.

    Skipping the random initialisers saves seconds on real-size models.
    """
    with torch.device("meta"):
        model = WHAMModel(config, model_id=model_id)
    model.to_empty(device="cpu")
    model.gpt.lm_head.weight = model.gpt.transformer.wte.weight
    return model


def random_model(
    preset: str, *, seed: int = 0, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> WHAMModel:
    """A model with random weights for a named preset; the same seed gives the same weights."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
    generator = torch.Generator().manual_seed(seed)
    model = empty_model(PRESETS[preset], model_id=f"preset:{preset}")
    model.gpt.reset_parameters(generator)
    with torch.no_grad():
        for name, p in model.tokenizer.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            else:  # conv/linear/embedding weights, scaled by fan-in so activations stay O(1)
                fan_in = max(1, p[0].numel()) if p.ndim > 2 else p.shape[-1]
                p.normal_(0.0, fan_in**-0.5, generator=generator)
    model.sha256 = weights_fingerprint(model.native_state_dict())
    return model.place(device=device, dtype=dtype)
