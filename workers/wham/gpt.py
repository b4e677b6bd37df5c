"""The WHAM transformer: a GPT-2 style decoder with a tied embedding and learned positions.

Parameter names match the reference checkpoints once the `predictor.gpt_model.` prefix is
stripped (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ...).

Four ways to run it:
- `forward(idx)`: the whole sequence from position 0 with explicit softmax attention; slow
  and obviously correct, the reference the fast paths are tested against (causal, or under
  an explicit [S, S] mask).
- `forward_cached(idx, cache, start=...)`: a chunk of tokens at absolute positions
  `start..start+L-1`, writing their keys/values into a preallocated `KVCache` and attending
  to everything cached before them (prefill, extend and eager decode).
- `decode_step(idx, cache, pos)`: one token at a position given as a tensor, attending over
  the whole static cache with a mask (or through flash-attn's KV-cache kernel); fixed shapes,
  so it can be compiled or graph-captured.
- `forward_at(idx, cache, positions=..., mask=...)`: tokens at any absolute positions (not
  necessarily adjacent), their keys/values written there, each attending to the cached
  positions its row of an explicit mask allows (diagonal decoding).

The linear layers are `workers.wham.linear.Linear` (an nn.Linear that can use prepacked CPU
weights); the state dict is the same as with plain nn.Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.wham.config import GPTConfig
from workers.wham.linear import Linear

try:  # optional fused decode kernel; only used on CUDA with half precision
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_with_kvcache = None


class KVCache:
    """Static key/value buffers [n_layer, batch, n_head, max_seq, head_dim], allocated once."""

    def __init__(
        self,
        config: GPTConfig,
        *,
        batch: int,
        max_seq: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (config.n_layer, batch, config.n_head, max_seq, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch = batch
        self.max_seq = max_seq

    @staticmethod
    def bytes_for(config: GPTConfig, *, batch: int, max_seq: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * batch * config.n_head * max_seq * config.head_dim * item

    def rows(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `batch` rows: [n_layer, batch, n_head, max_seq, head_dim]."""
        return self.k[:, :batch], self.v[:, :batch]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Queries over cached keys: q [B, H, L, hd], keys/values [B, H, S, hd], mask [L, S]
    (True: may attend; None: every key) -> [B, H, L, hd].

    Written out rather than through SDPA: on the CPU this is as fast for a few queries, and
    SDPA's kernel splits the keys across threads when the batch has few heads, so a row's
    result would depend on how many other rows share the batch.
    """
    scores = (q @ keys.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, L, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ values  # [B, H, L, hd]


def _layer_norm(n_embd: int, *, parametric: bool, bias: bool) -> nn.LayerNorm:
    if not parametric:
        return nn.LayerNorm(n_embd, eps=1e-5, elementwise_affine=False)
    return nn.LayerNorm(n_embd, eps=1e-5, bias=bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, d = x.shape  # [B, L, D]
        q, k, v = self.c_attn(x).split(d, dim=2)
        # [B, L, D] -> [B, H, L, hd]
        shape = (b, length, self.n_head, self.head_dim)
        return tuple(t.view(shape).transpose(1, 2) for t in (q, k, v))

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = y.shape  # [B, H, L, hd] -> [B, L, D]
        return self.c_proj(y.transpose(1, 2).reshape(b, length, self.n_head * self.head_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask [L, L] (True: query i may attend to key j); None: causal."""
        q, k, v = self._qkv(x)
        length = x.shape[1]
        if mask is None:
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # [B, H, L, L]
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return self._out(att @ v)

    def forward_cached(
        self,
        x: torch.Tensor,
        *,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """mask: None for one token (it sees the whole cache) or a chunk from position 0
        (causal); else [L, end], query i seeing keys <= start + i."""
        q, k, v = self._qkv(x)  # [B, H, L, hd]
        end = start + x.shape[1]
        k_cache[:, :, start:end] = k  # k_cache: [B, H, S, hd]
        v_cache[:, :, start:end] = v
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        if x.shape[1] == 1:
            return self._out(_attend(q, keys, values))
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
        return self._out(y)

    def decode_step(
        self,
        x: torch.Tensor,
        *,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """mask [1, S] (positions <= pos) for the masked whole-cache attention; None selects
        flash-attn's KV-cache kernel, which appends k/v in place at cache_seqlens = pos."""
        q, k, v = self._qkv(x)  # [B, H, 1, hd]
        if mask is None:
            # flash-attn wants [B, S, H, hd]; a transposed view keeps the last dim contiguous
            # and the kernel writes the new key/value in place at cache_seqlens.
            seqlens = pos.to(torch.int32).expand(x.shape[0]).contiguous()
            y = flash_attn_with_kvcache(
                q.transpose(1, 2),
                k_cache.transpose(1, 2),
                v_cache.transpose(1, 2),
                k=k.transpose(1, 2),
                v=v.transpose(1, 2),
                cache_seqlens=seqlens,
                causal=True,
            )  # [B, 1, H, hd]
            return self._out(y.transpose(1, 2))
        k_cache.index_copy_(2, pos, k)  # k_cache: [B, H, S, hd]
        v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self._out(y)

    def forward_at(
        self,
        x: torch.Tensor,
        *,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, P, D] at `positions` [P]: keys/values written there, then attention over the
        first mask.shape[1] cached positions under mask [P, S'] (True: may attend)."""
        q, k, v = self._qkv(x)  # [B, H, P, hd]
        k_cache.index_copy_(2, positions, k)  # k_cache: [B, H, S, hd]
        v_cache.index_copy_(2, positions, v)
        span = mask.shape[1]
        return self._out(_attend(q, k_cache[:, :, :span], v_cache[:, :, :span], mask))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm block; version 2 uses parameter-free LayerNorms."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        parametric = config.version == 1
        self.ln_1 = _layer_norm(config.n_embd, parametric=parametric, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _layer_norm(config.n_embd, parametric=parametric, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, **cache_args) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.ln_1(x), **cache_args)
        return x + self.mlp(self.ln_2(x))

    def decode_step(self, x: torch.Tensor, **cache_args) -> torch.Tensor:
        x = x + self.attn.decode_step(self.ln_1(x), **cache_args)
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, **cache_args) -> torch.Tensor:
        x = x + self.attn.forward_at(self.ln_1(x), **cache_args)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": _layer_norm(config.n_embd, parametric=True, bias=config.bias),
            }
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in the checkpoints
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation (normal 0.02, residual projections scaled by depth)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    p.normal_(0.0, residual_std, generator=generator)
                elif name.endswith(".bias"):
                    p.zero_()
                elif p.ndim == 1:  # LayerNorm weight
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=generator)

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(idx) + self.transformer.wpe(pos)  # [B, L, D]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(x))

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx [B, S] at positions 0..S-1 (or at `positions` [S]) -> logits [B, S, V]; mask
        [S, S] or [B, 1, S, S] (True: token i may attend to token j) replaces the causal one.
        Training under diagonal decoding's attention pattern feeds extra tokens at positions
        that already hold one (`workers.wham.diagonal_training`)."""
        length = idx.shape[1]
        if positions is None:
            if length > self.config.block_size:
                raise ValueError(f"sequence of {length} tokens > block_size "
                                 f"{self.config.block_size}")
            positions = torch.arange(length, device=idx.device)
        elif positions.numel() and int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} >= block_size "
                             f"{self.config.block_size}")
        x = self._embed(idx, positions)
        for block in self.transformer.h:
            x = block(x, mask)
        return self._head(x)

    def forward_cached(
        self,
        idx: torch.Tensor,
        *,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """idx [B, L] at positions start..start+L-1 -> logits [B, V] of the last token
        (or [B, L, V] with all_logits). Caches are [n_layer, B, H, S, hd]."""
        length = idx.shape[1]
        end = start + length
        positions = torch.arange(start, end, device=idx.device)
        mask = None
        if length > 1 and start > 0:  # query i sees keys <= start + i: [L, end]
            mask = torch.arange(end, device=idx.device)[None, :] <= positions[:, None]
        x = self._embed(idx, positions)
        for i, block in enumerate(self.transformer.h):
            x = block.forward_cached(x, k_cache=k_cache[i], v_cache=v_cache[i], start=start,
                                     mask=mask)
        return self._head(x if all_logits else x[:, -1])

    def decode_step(
        self,
        idx: torch.Tensor,
        *,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        pos: torch.Tensor,
        use_flash: bool = False,
    ) -> torch.Tensor:
        """idx [B, 1] at position pos (LongTensor [1]) -> logits [B, V]; fixed shapes.
        Caches are [n_layer, B, H, S, hd]; use_flash selects flash-attn's KV-cache kernel."""
        mask = None
        if not use_flash:  # the whole static cache, masked to the filled positions: [1, S]
            mask = (torch.arange(k_cache.shape[3], device=idx.device) <= pos)[None]
        x = self._embed(idx, pos)
        for i, block in enumerate(self.transformer.h):
            x = block.decode_step(x, k_cache=k_cache[i], v_cache=v_cache[i], pos=pos, mask=mask)
        return self._head(x[:, -1])

    def forward_at(
        self,
        idx: torch.Tensor,
        *,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """idx [B, P] at absolute `positions` [P] (LongTensor, any order, not necessarily
        adjacent) -> logits [B, P, V]. Their keys/values are written at those positions; query
        i attends to the cached positions j < mask.shape[1] with mask[i, j] (itself included
        when allowed). Caches are [n_layer, B, H, S, hd]."""
        x = self._embed(idx, positions)
        for i, block in enumerate(self.transformer.h):
            x = block.forward_at(x, k_cache=k_cache[i], v_cache=v_cache[i], positions=positions,
                                 mask=mask)
        return self._head(x)


def flash_installed() -> bool:
    """flash-attn's KV-cache kernel (or a stand-in put in its place) is importable."""
    return flash_attn_with_kvcache is not None


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    """The fused kernel runs only on CUDA in half precision and when flash-attn imports."""
    return flash_installed() and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
