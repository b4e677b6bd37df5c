"""Image tokenizers: uint8 frames <-> image tokens.

Two layouts, each named after the official state dict under ``context_encoders.images.``:
the convolutional taming VQ-GAN (WHAM 200M style) and the ViT-VQGAN (WHAM 1.6B style).
Both share the input checks in `base`.
"""

from __future__ import annotations

from torch import nn

from workers.wham.tokenizers.taming import TamingConfig, TamingVQGAN
from workers.wham.tokenizers.vit import ViTConfig, ViTVQGAN

TokenizerConfig = TamingConfig | ViTConfig
TOKENIZER_CONFIGS: dict[str, type[TamingConfig] | type[ViTConfig]] = {
    "taming": TamingConfig,
    "vit": ViTConfig,
}


def build_tokenizer(config: TokenizerConfig) -> nn.Module:
    """The tokenizer module for a config (weights uninitialised by the caller's choice)."""
    return TamingVQGAN(config) if isinstance(config, TamingConfig) else ViTVQGAN(config)


__all__ = [
    "TOKENIZER_CONFIGS",
    "TamingConfig",
    "TamingVQGAN",
    "TokenizerConfig",
    "ViTConfig",
    "ViTVQGAN",
    "build_tokenizer",
]
