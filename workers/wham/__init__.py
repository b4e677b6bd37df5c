"""WHAM model package: transformer, tokenizers, checkpoint loading and the rollout engine.

Layout (imports only go down this list; nothing here imports the pipeline or Ray):
    errors, actions              plain Python + numpy
    tokenizers/                  image <-> tokens (taming VQ-GAN, ViT-VQGAN)
    config                       GPTConfig, GPT_SIZES, WHAMConfig, PRESETS
    linear, gpt                  the transformer and its KV cache
    model                        WHAMModel, random weights, the weight fingerprint
    checkpoints/                 native folders, official .ckpt files, safe unpickling
    sampling, rollout, diagonal  sampler; validated inputs and step bookkeeping; the passes
                                 of diagonal decoding
    engine, naive, resources     the cached engine, the slow reference, batch/thread sizing

Names are resolved lazily (PEP 562): the command line imports `workers.wham.errors` for
every command, and importing the package must not pull in torch (about a second) for
commands that never touch a model.
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
    "WHAMConfig": "workers.wham.config",
    "PRESETS": "workers.wham.config",
    "SamplingParams": "workers.wham.sampling",
    "Rollout": "workers.wham.rollout",
    "StepOutput": "workers.wham.rollout",
    "prepare_rollout": "workers.wham.rollout",
    "RolloutEngine": "workers.wham.engine",
    "Decoder": "workers.wham.engine",
    "decode_n_tokens": "workers.wham.engine",
    "decode_diagonals": "workers.wham.engine",
    "DECODINGS": "workers.wham.modes",
    "naive_rollout": "workers.wham.naive",
    "max_batch_for_memory": "workers.wham.resources",
    "auto_batch_size": "workers.wham.resources",
    "set_cpu_threads": "workers.wham.resources",
    "WHAMModel": "workers.wham.model",
    "random_model": "workers.wham.model",
    "load_model": "workers.wham.checkpoints",
    "save_native": "workers.wham.checkpoints",
    "convert_checkpoint": "workers.wham.checkpoints",
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
