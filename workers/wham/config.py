"""Transformer hyperparameters and the named sizes of the reference code.

The head count cannot be recovered from weight shapes, so loaders resolve a size name (or
explicit numbers) through `GPT_SIZES` rather than guessing from the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.wham.errors import CheckpointError

# name -> (n_layer, n_head, n_embd). The first four are the reference code's sizes; the rest
# are small shapes for tests and benchmarks on a CPU.
GPT_SIZES: dict[str, tuple[int, int, int]] = {
    "chinchilla-251M": (16, 16, 1024),  # WHAM 200M
    "chinchilla-1018M": (23, 14, 1792),
    "wham-4kvocab-1.6b": (24, 18, 2304),  # WHAM 1.6B
    "wham-3b": (30, 24, 3072),
    "tiny": (2, 2, 32),
    "small": (4, 4, 256),
}

# Steps of context the reference models were trained with (block_size = this * tokens/step).
DEFAULT_SEQ_LEN = 10


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the GPT-2 style decoder.

    version 1: LayerNorms with weight (and bias if `bias`) everywhere.
    version 2: parameter-free LayerNorms inside the blocks; the final `ln_f` keeps its
    parameters (a quirk of the reference code that checkpoints depend on).
    """

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    version: int = 1
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise CheckpointError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.version not in (1, 2):
            raise CheckpointError(f"GPTConfig.version must be 1 or 2, got {self.version!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self) -> int:
        """Parameter count (embedding tied to the head, so counted once)."""
        d = self.n_embd
        norm = 2 * d if self.bias else d
        linear = 12 * d * d + (9 * d if self.bias else 0)  # c_attn, c_proj, c_fc, c_proj
        norms = 0 if self.version == 2 else 2 * norm  # ln_1, ln_2
        ln_f = norm
        return self.n_layer * (linear + norms) + ln_f + (self.vocab_size + self.block_size) * d


def gpt_config_for(
    size: str,
    *,
    vocab_size: int,
    tokens_per_step: int,
    seq_len: int = DEFAULT_SEQ_LEN,
    version: int = 1,
    bias: bool = True,
) -> GPTConfig:
    """Build a GPTConfig from a size name in GPT_SIZES; block_size = seq_len * tokens_per_step."""
    if size not in GPT_SIZES:
        known = ", ".join(sorted(GPT_SIZES))
        raise CheckpointError(f"unknown transformer size {size!r}; known sizes: {known}")
    n_layer, n_head, n_embd = GPT_SIZES[size]
    return GPTConfig(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab_size,
        block_size=seq_len * tokens_per_step,
        version=version,
        bias=bias,
    )
