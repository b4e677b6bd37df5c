"""ViT-VQGAN image tokenizer (WHAM 1.6B style): patches -> transformer -> cosine codebook.

Module names mirror the official state dict under ``context_encoders.images.``: ``encoder.*``,
``vq_vae._embedding.weight`` and ``decoder.*``. Images are normalised with ImageNet statistics,
zero-padded right/bottom (after normalisation) to a multiple of the patch size and cut into
patches in row-major order over the patch grid, each patch flattened channel-major.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.wham.errors import InputError
from workers.wham.tokenizers.base import ImageTokenizer, TokenGrid, as_image_batch, as_token_batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig(TokenGrid):
    """Hyperparameters of the ViT-VQGAN (names follow the official ``model_spec``)."""

    image_size: tuple[int, int] = (180, 300)  # (H, W)
    patch_size: int = 10
    transf_dim: int = 768
    embedding_dim: int = 32
    num_layers: int = 12
    head_size: int = 64
    vocab_size: int = 16384
    kind: str = field(default="vit", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if min(self.image_size) <= 0 or self.patch_size <= 0:
            raise InputError(f"vit tokenizer: bad image size {self.image_size} / patch size")
        if self.transf_dim % self.head_size:
            raise InputError(
                f"vit tokenizer: transf_dim {self.transf_dim} is not a multiple of head_size "
                f"{self.head_size}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row after padding: (rows, cols)."""
        p = self.patch_size
        return (math.ceil(self.image_size[0] / p), math.ceil(self.image_size[1] / p))

    @property
    def n_head(self) -> int:
        return self.transf_dim // self.head_size

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("kind")
        return out


class _LayerNormNoBias(nn.Module):
    """LayerNorm with a learned scale only (the reference's bias-free blocks), eps 1e-5."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # [B, N, 3D] -> 3 x [B, heads, N, D/heads]
        q, k, v = (t.reshape(b, n, self.n_head, d // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v)  # non-causal: every patch sees every patch
        return self.c_proj(y.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = _LayerNormNoBias(dim)
        self.attn = _SelfAttention(dim, n_head)
        self.ln_2 = _LayerNormNoBias(dim)
        self.mlp = _MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _ViT(nn.Module):
    """proj1 + learned positions -> blocks -> LayerNorm -> output_proj (encoder or decoder)."""

    def __init__(self, cfg: ViTConfig, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj1 = nn.Linear(in_dim, cfg.transf_dim)
        self.pos_embeds = nn.Embedding(cfg.tokens_per_image, cfg.transf_dim)
        self.vit = nn.Sequential(*[_Block(cfg.transf_dim, cfg.n_head)
                                   for _ in range(cfg.num_layers)])
        self.output_ln = nn.LayerNorm(cfg.transf_dim)
        self.output_proj = nn.Linear(cfg.transf_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj1(x) + self.pos_embeds.weight  # [B, N, transf_dim]
        return self.output_proj(self.output_ln(self.vit(h)))


class _Quantizer(nn.Module):
    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self._embedding = nn.Embedding(vocab_size, dim)

    def codes(self) -> torch.Tensor:
        return F.normalize(self._embedding.weight, dim=1)  # [V, D], unit length


class ViTVQGAN(ImageTokenizer):
    """uint8 images (B, T, 3, H, W) <-> tokens (B, T, rows*cols) with a ViT-VQGAN."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        patch_dim = 3 * config.patch_size**2
        self.encoder = _ViT(config, in_dim=patch_dim, out_dim=config.embedding_dim)
        self.vq_vae = _Quantizer(config.vocab_size, config.embedding_dim)
        self.decoder = _ViT(config, in_dim=config.embedding_dim, out_dim=patch_dim)

    def _device(self) -> torch.device:
        return self.vq_vae._embedding.weight.device

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ImageNet mean and std shaped [1, 3, 1, 1] on like's device and dtype."""
        mean = torch.tensor(IMAGENET_MEAN, device=like.device, dtype=like.dtype)
        std = torch.tensor(IMAGENET_STD, device=like.device, dtype=like.dtype)
        return mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] normalised -> [N, rows*cols, 3*p*p] (zero pad right/bottom first)."""
        p = self.config.patch_size
        rows, cols = self.grid
        h, w = self.image_size
        x = F.pad(x, (0, cols * p - w, 0, rows * p - h))
        x = x.reshape(x.shape[0], 3, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(x.shape[0], rows * cols, 3 * p * p)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, rows*cols, 3*p*p] -> [N, 3, H, W] (fold back, crop the padding)."""
        p = self.config.patch_size
        rows, cols = self.grid
        h, w = self.image_size
        x = patches.reshape(patches.shape[0], rows, cols, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(patches.shape[0], 3, rows * p, cols * p)[:, :, :h, :w]

    @torch.no_grad()
    def encode(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        imgs = as_image_batch(images, image_size=self.image_size, device=self._device())
        b, t = imgs.shape[:2]
        dtype = self.vq_vae._embedding.weight.dtype
        x = imgs.reshape(b * t, *imgs.shape[2:]).to(dtype) / 255.0
        mean, std = self._stats(x)
        x = (x - mean) / std
        z = F.normalize(self.encoder(self._patchify(x)), dim=-1)  # [BT, N, D]
        codes = self.vq_vae.codes()
        # The reference takes the argmin of the squared distance between unit vectors.
        dist = z.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1) - 2 * z @ codes.t()
        return dist.argmin(dim=-1).reshape(b, t, -1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Tokens (B, T, n) -> uint8 tensor (B, T, 3, H, W) on the tokenizer's device."""
        idx = as_token_batch(tokens, tokens_per_image=self.tokens_per_image,
                             vocab_size=self.vocab_size, device=self._device())
        b, t = idx.shape[:2]
        z = self.vq_vae.codes()[idx.reshape(b * t, -1)]  # [BT, N, D]
        x = self._unpatchify(self.decoder(z))
        mean, std = self._stats(x)
        x = (x * std + mean).clamp(0.0, 1.0)
        # The reference truncates (no rounding) when mapping [0, 1] to [0, 255].
        pixels = (x * 255.0).to(torch.uint8)
        return pixels.reshape(b, t, *pixels.shape[1:])
