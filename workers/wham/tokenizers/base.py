"""What the two image tokenizers (taming VQ-GAN and ViT-VQGAN) share: the token grid of their
configs, the sizes every tokenizer answers for, and the input checks.

An image becomes `rows x cols` tokens in raster order: token `r * cols + c` covers grid cell
(r, c), row by row from the top left, as the official tokenizers lay them out.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.wham.errors import InputError


class TokenGrid:
    """Mixin of the tokenizer configs, which define `grid` (rows, cols): the image's tokens."""

    grid: tuple[int, int]

    @property
    def tokens_per_image(self) -> int:
        rows, cols = self.grid
        return rows * cols


class ImageTokenizer(nn.Module):
    """uint8 images (B, T, 3, H, W) <-> tokens (B, T, rows * cols); the sizes come from the
    config (`image_size`, `grid`, `vocab_size`)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def as_image_batch(
    images: torch.Tensor | np.ndarray, *, image_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Validate uint8 images (B, T, 3, H, W) and return them as a uint8 tensor on ``device``.

    Raises InputError naming the expected and the received shape or dtype.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images: expected a uint8 tensor or array, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise InputError(f"images: expected dtype uint8, got {images.dtype}")
    height, width = image_size
    if images.ndim != 5 or tuple(images.shape[2:]) != (3, height, width):
        raise InputError(
            f"images: expected shape (B, T, 3, {height}, {width}) for this model "
            f"(H={height}, W={width}), got {tuple(images.shape)}"
        )
    return images.to(device)


def as_token_batch(
    tokens: torch.Tensor | np.ndarray, *, tokens_per_image: int, vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Validate image tokens (B, T, n) with values in [0, vocab_size) and return int64 on device."""
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(np.ascontiguousarray(tokens))
    is_tensor = isinstance(tokens, torch.Tensor)
    if not is_tensor or tokens.dtype.is_floating_point or tokens.is_complex():
        raise InputError("image tokens: expected an integer tensor or array (B, T, n)")
    if tokens.ndim != 3 or tokens.shape[2] != tokens_per_image:
        raise InputError(
            f"image tokens: expected shape (B, T, {tokens_per_image}), got {tuple(tokens.shape)}"
        )
    tokens = tokens.to(device=device, dtype=torch.long)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise InputError(
            f"image tokens: values must lie in [0, {vocab_size}), got "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    return tokens
