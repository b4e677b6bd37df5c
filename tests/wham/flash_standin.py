"""A pure-torch stand-in for flash-attn's `flash_attn_with_kvcache`, so the flash decode path
runs on a CPU in tests. Same signature and semantics for what the engine uses: caches
[B, S, H, hd] (strided views allowed), k/v [B, L, H, hd] appended in place at
`cache_seqlens[b]`, attention over the first `cache_seqlens[b] + L` keys, `causal` aligned to
the bottom right, output [B, Lq, H, hd]. Slow (a loop over rows with host reads): tests only."""

from __future__ import annotations

import math

import torch


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                            softmax_scale=None, causal=False, **unused):
    assert not unused, f"stand-in does not implement {sorted(unused)}"
    batch, q_len, _, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(q)
    for b in range(batch):
        filled = int(cache_seqlens[b])
        if k is not None:
            k_cache[b, filled:filled + k.shape[1]] = k[b]
            v_cache[b, filled:filled + v.shape[1]] = v[b]
            filled += k.shape[1]
        keys, values = k_cache[b, :filled].transpose(0, 1), v_cache[b, :filled].transpose(0, 1)
        scores = (q[b].transpose(0, 1) @ keys.transpose(1, 2)) * scale  # [H, Lq, filled]
        if causal:  # query i sees keys up to filled - q_len + i
            seen = torch.arange(filled)[None, :] <= torch.arange(filled - q_len, filled)[:, None]
            scores = scores.masked_fill(~seen, float("-inf"))
        out[b] = (scores.softmax(dim=-1) @ values).transpose(0, 1)  # [Lq, H, hd]
    return out
