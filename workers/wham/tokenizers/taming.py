"""Convolutional VQ-GAN image tokenizer in the taming-transformers layout (WHAM 200M style).

Module names mirror the official state dict under ``context_encoders.images.``:
``vq_model.encoder.*``, ``vq_model.quant_conv.*``, ``vq_model.quantize.embedding.weight``,
``vq_model.post_quant_conv.*`` and ``vq_model.decoder.*``. The encoder halves the resolution
``len(ch_mult) - 1`` times; every latent cell becomes one token, so the token grid is the
latent grid, in raster order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.wham.errors import InputError
from workers.wham.tokenizers.base import ImageTokenizer, TokenGrid, as_image_batch, as_token_batch


@dataclass(frozen=True)
class TamingConfig(TokenGrid):
    """Hyperparameters of the taming VQ-GAN (the official ``taming_ddconfig`` plus codebook)."""

    image_size: tuple[int, int] = (128, 128)  # (H, W)
    n_embed: int = 4096  # codebook size (V_img)
    embed_dim: int = 256  # code dimension
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False
    resolution: int | None = None  # the official square size that decides attention levels
    kind: str = field(default="taming", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "ch_mult", tuple(int(v) for v in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(v) for v in self.attn_resolutions))
        if self.resolution is None:
            object.__setattr__(self, "resolution", self.image_size[0])
        factor = self.downsample_factor
        for name, size in zip(("H", "W"), self.image_size, strict=True):
            if size <= 0 or size % factor:
                raise InputError(
                    f"taming tokenizer: image {name}={size} must be a positive multiple of "
                    f"{factor} (2 ** (len(ch_mult) - 1))"
                )
        for width in {self.ch * m for m in (1, *self.ch_mult)}:
            if width % 32:
                raise InputError(f"taming tokenizer: channel count {width} is not a multiple of 32")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Latent cells per column and per row: (rows, cols)."""
        return (self.image_size[0] // self.downsample_factor,
                self.image_size[1] // self.downsample_factor)

    @property
    def vocab_size(self) -> int:
        return self.n_embed

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("kind")
        return out


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all latent cells, 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]; SDPA's default scale is C ** -0.5 as in taming.
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric right/bottom padding, as the taming encoder does.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: TamingConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, cfg.ch * mult))
                block_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, z, H/f, W/f]


class Decoder(nn.Module):
    def __init__(self, cfg: TamingConfig) -> None:
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        up: list[nn.Module] = []
        for i in reversed(range(levels)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i]))
                block_in = cfg.ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)  # index by level so the names match the official layout
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, H, W]


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code by squared L2 for z [B, D, h, w] -> [B, h*w] (row-major)."""
        b, d = z.shape[:2]
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D]
        codes = self.embedding.weight
        # Same expansion as the reference (|z|^2 + |e|^2 - 2 z.e), so ties break identically.
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        return dist.argmin(dim=1).reshape(b, -1)

    def lookup(self, indices: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Codes for indices [B, h*w] -> [B, D, h, w]."""
        b = indices.shape[0]
        z = self.embedding(indices).reshape(b, *grid, -1)
        return z.permute(0, 3, 1, 2).contiguous()


class _VQModel(nn.Module):
    def __init__(self, cfg: TamingConfig) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)


class TamingVQGAN(ImageTokenizer):
    """uint8 images (B, T, 3, H, W) <-> tokens (B, T, h*w) with a taming VQ-GAN."""

    def __init__(self, config: TamingConfig) -> None:
        super().__init__(config)
        self.vq_model = _VQModel(config)

    def _device(self) -> torch.device:
        return self.vq_model.quant_conv.weight.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        imgs = as_image_batch(images, image_size=self.image_size, device=self._device())
        b, t = imgs.shape[:2]
        dtype = self.vq_model.quant_conv.weight.dtype
        x = imgs.reshape(b * t, *imgs.shape[2:]).to(dtype) / 127.5 - 1.0  # [BT, 3, H, W]
        z = self.vq_model.quant_conv(self.vq_model.encoder(x))
        return self.vq_model.quantize.indices(z).reshape(b, t, -1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Tokens (B, T, n) -> uint8 tensor (B, T, 3, H, W) on the tokenizer's device."""
        idx = as_token_batch(tokens, tokens_per_image=self.tokens_per_image,
                             vocab_size=self.vocab_size, device=self._device())
        b, t = idx.shape[:2]
        z = self.vq_model.quantize.lookup(idx.reshape(b * t, -1), self.grid)
        x = self.vq_model.decoder(self.vq_model.post_quant_conv(z))
        # The reference truncates (no rounding) after mapping [-1, 1] to [0, 255].
        pixels = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)
        return pixels.reshape(b, t, *pixels.shape[1:])
