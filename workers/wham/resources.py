"""How much of the machine a model may use: rollouts per batch for the free accelerator
memory, and CPU threads for the cores this process may run on."""

from __future__ import annotations

import os

import torch

from workers.wham.gpt import KVCache
from workers.wham.model import WHAMModel

CPU_BATCH = 8  # batch_size "auto" off CUDA: the KV cache is small next to host memory
HEADROOM = 0.85  # share of the free accelerator memory a replica plans to use


def kv_cache_bytes(model: WHAMModel, batch: int) -> int:
    """Bytes of the engine's static KV cache for `batch` rollouts in the model's dtype."""
    cfg = model.gpt.config
    return KVCache.bytes_for(cfg, batch=batch, max_seq=cfg.block_size, dtype=model.dtype)


def max_batch_for_memory(model: WHAMModel, free_bytes: int) -> int:
    """Largest batch whose KV cache plus working memory fits in free_bytes (weights already
    loaded). Keeps 10% headroom; 0 when not even one rollout fits."""
    cfg = model.gpt.config
    item = torch.empty((), dtype=model.dtype).element_size()
    # Prefill of a full window: residual, q/k/v, attention out and the 4x MLP activation.
    working = cfg.block_size * cfg.n_embd * 12 * item + cfg.vocab_size * 4 * 4
    per_row = kv_cache_bytes(model, 1) + working
    return max(0, int(free_bytes * 0.9) // per_row)


def auto_batch_size(model: WHAMModel, *, free_bytes: int | None = None,
                    headroom: float = HEADROOM) -> int:
    """Rollouts per batch for `resources.batch_size: auto`: on CUDA as many as fit in
    `headroom` of the free memory (read from the device unless `free_bytes` is given; at
    least 1), elsewhere CPU_BATCH."""
    if free_bytes is None:
        if model.device.type != "cuda":
            return CPU_BATCH
        free_bytes, _ = torch.cuda.mem_get_info(model.device)
    return max(1, max_batch_for_memory(model, int(free_bytes * headroom)))


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_cpu_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to `requested` (or every available core), never more than
    the cores available: more threads than cores thrash. Returns the count set."""
    threads = available_cpus() if requested is None else max(1, min(requested, available_cpus()))
    torch.set_num_threads(threads)
    return threads
