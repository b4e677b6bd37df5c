"""WHAM model package: transformer, tokenizers, checkpoint loading and the rollout engine.

Names are resolved lazily (PEP 562) so `import workers.wham` stays cheap and torch is only
imported when a model-side name is first used.
"""

from __future__ import annotations

import importlib

from workers.wham.errors import CheckpointError, InputError, WHAMError

# public name -> module that defines it
_LAZY = {
    "GPT": "workers.wham.gpt",
    "KVCache": "workers.wham.gpt",
    "GPTConfig": "workers.wham.config",
    "GPT_SIZES": "workers.wham.config",
    "gpt_config_for": "workers.wham.config",
    "SamplingParams": "workers.wham.sampling",
    "RolloutEngine": "workers.wham.engine",
    "StepOutput": "workers.wham.engine",
    "max_batch_for_memory": "workers.wham.engine",
    "naive_rollout": "workers.wham.engine",
}

__all__ = ["CheckpointError", "InputError", "WHAMError", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workers.wham' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
