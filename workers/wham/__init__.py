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
    "WHAMModel": "workers.wham.model",
    "WHAMConfig": "workers.wham.model",
    "PRESETS": "workers.wham.model",
    "random_model": "workers.wham.model",
    "load_model": "workers.wham.model",
    "save_native": "workers.wham.model",
    "convert_checkpoint": "workers.wham.checkpoint",
    "BUTTON_NAMES": "workers.wham.actions",
    "STICK_NAMES": "workers.wham.actions",
    "ACTION_NAMES": "workers.wham.actions",
    "NUM_STICK_BINS": "workers.wham.actions",
    "CENTRE_BIN": "workers.wham.actions",
    "STICK_BIN_EDGES": "workers.wham.actions",
    "STICK_BIN_CENTRES": "workers.wham.actions",
    "sticks_to_bins": "workers.wham.actions",
    "bins_to_sticks": "workers.wham.actions",
    "validate_actions": "workers.wham.actions",
    "actions_to_tokens": "workers.wham.actions",
    "tokens_to_actions": "workers.wham.actions",
    "action_token_ranges": "workers.wham.actions",
}

__all__ = ["CheckpointError", "InputError", "WHAMError", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workers.wham' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
