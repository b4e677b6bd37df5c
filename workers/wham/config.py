"""Model hyperparameters: the transformer's named sizes, `WHAMConfig` and the presets.

The head count cannot be recovered from weight shapes, so loaders resolve a size name (or
explicit numbers) through `GPT_SIZES` rather than guessing from the state dict. Every GPT
config built from a size name goes through `gpt_config_for`.

Every config is checked against the limits below when it is built, so a damaged or hostile
checkpoint (`n_layer: 1000000`, a 100000x100000 image) is refused before any tensor is
allocated. The limits are generous multiples of the largest published WHAM (1.6B: 24 layers,
n_embd 2304, 16K image codes, 300x180 frames, 5560 positions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from workers.wham.actions import ACTION_DIM, ACTION_VOCAB_SIZE
from workers.wham.errors import CheckpointError
from workers.wham.tokenizers import TOKENIZER_CONFIGS, TamingConfig, TokenizerConfig, ViTConfig

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

#: Transformer blocks (and tokenizer layers or blocks per level).
MAX_LAYERS = 256
#: Widths: n_embd, tokenizer channels and code sizes.
MAX_WIDTH = 16384
#: Attention heads.
MAX_HEADS = 512
#: Image codes: tables store image tokens as uint16.
MAX_IMAGE_CODES = 2**16
#: Positions in the transformer's window (block_size), and image tokens per frame.
MAX_POSITIONS = 2**15
#: Pixels per side of the model's frames; seeds are resized to the model's size, never more.
MAX_IMAGE_SIDE = 4096
#: Entries of a tokenizer's per-level tuples (ch_mult, attn_resolutions).
MAX_LEVELS = 16
#: Parameters of the whole model (the largest size in GPT_SIZES has about 3.5 billion).
MAX_PARAMS = 20 * 10**9


def _beyond(what: str, value: int, limit: int) -> CheckpointError:
    return CheckpointError(f"{what}={value} is beyond the limit of {limit} this program builds "
                           "(a damaged or foreign model config?)")


def check_image_size(image_size: tuple[int, ...], *, what: str = "image_size") -> None:
    """CheckpointError unless (H, W) are positive and at most MAX_IMAGE_SIDE."""
    if len(image_size) != 2 or not all(0 < side <= MAX_IMAGE_SIDE for side in image_size):
        raise CheckpointError(f"{what}={tuple(image_size)}: expected (H, W) of at most "
                              f"{MAX_IMAGE_SIDE} pixels per side")


def check_tokenizer(tok: TokenizerConfig) -> None:
    """CheckpointError when a tokenizer config asks for more than the limits."""
    check_image_size(tok.image_size, what="tokenizer.image_size")
    for field in fields(tok):
        value = getattr(tok, field.name)
        if field.name == "image_size" or value is None or isinstance(value, bool | str):
            continue
        limit = MAX_LAYERS if field.name in ("num_layers", "num_res_blocks") else MAX_WIDTH
        if field.name in ("vocab_size", "n_embed"):
            limit = MAX_IMAGE_CODES
        values = value if isinstance(value, tuple) else (value,)
        if len(values) > MAX_LEVELS:
            raise _beyond(f"len(tokenizer.{field.name})", len(values), MAX_LEVELS)
        least = 0 if field.name == "num_res_blocks" else 1  # 0: a level without res blocks
        for item in values:
            if not isinstance(item, int) or isinstance(item, bool) or item < least:
                kind = "positive integers" if least else "integers >= 0"
                raise CheckpointError(f"tokenizer.{field.name}={value!r}: expected {kind}")
            if item > limit:
                raise _beyond(f"tokenizer.{field.name}", item, limit)
    if tok.tokens_per_image > MAX_POSITIONS:
        raise _beyond("tokenizer tokens per image", tok.tokens_per_image, MAX_POSITIONS)


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
        limits = {"n_layer": MAX_LAYERS, "n_head": MAX_HEADS, "n_embd": MAX_WIDTH,
                  "vocab_size": MAX_IMAGE_CODES + ACTION_VOCAB_SIZE, "block_size": MAX_POSITIONS}
        for name, limit in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
            if value > limit:
                raise _beyond(f"gpt.{name}", value, limit)
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


@dataclass(frozen=True)
class WHAMConfig:
    """Everything needed to build a WHAMModel (weights aside)."""

    gpt: GPTConfig
    tokenizer: TokenizerConfig
    seq_len: int = DEFAULT_SEQ_LEN
    gpt_size: str | None = None  # the size name when it is one of GPT_SIZES

    def __post_init__(self) -> None:
        check_tokenizer(self.tokenizer)

    @property
    def tokens_per_step(self) -> int:
        return self.tokenizer.tokens_per_image + ACTION_DIM

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: TokenizerConfig,
        *,
        gpt_size: str,
        seq_len: int = DEFAULT_SEQ_LEN,
        version: int = 1,
        bias: bool = True,
    ) -> WHAMConfig:
        """Size the GPT for a tokenizer: vocab = V_img + 68, block = seq_len * tokens/step."""
        gpt = gpt_config_for(
            gpt_size,
            vocab_size=tokenizer.vocab_size + ACTION_VOCAB_SIZE,
            tokens_per_step=tokenizer.tokens_per_image + ACTION_DIM,
            seq_len=seq_len,
            version=version,
            bias=bias,
        )
        return cls(gpt=gpt, tokenizer=tokenizer, seq_len=seq_len, gpt_size=gpt_size)

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "gpt_size": self.gpt_size,
            "gpt": asdict(self.gpt),
            "tokenizer": {"kind": self.tokenizer.kind, **self.tokenizer.to_dict()},
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str) -> WHAMConfig:
        try:
            tok = dict(data["tokenizer"])
            tok_cls = TOKENIZER_CONFIGS[tok.pop("kind")]
            return cls(
                gpt=GPTConfig(**data["gpt"]),
                tokenizer=tok_cls(**tok),
                seq_len=int(data["seq_len"]),
                gpt_size=data.get("gpt_size"),
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise CheckpointError(
                f"{source}: bad model config ({type(exc).__name__}: {exc})"
            ) from exc


# The ViT-VQGAN layout of WHAM 1.6B: 300x180 frames, patch 10 -> 30x18 = 540 tokens, 16K codes.
# Its hidden sizes are stand-ins (the checkpoint holds the real ones).
_VIT_540 = ViTConfig(image_size=(180, 300), patch_size=10, transf_dim=768, embedding_dim=32,
                     num_layers=12, head_size=64, vocab_size=16384)

# Real WHAM shapes. The transformer sizes are the reference table's; the tokenizers'
# hidden sizes are not published outside the checkpoints, so these are stand-ins with the
# published image sizes and token counts (1.6B: 300x180, patch 10 -> 540 tokens, 16K codes;
# 200M: 128x128 taming VQ-GAN). Load the real checkpoints for the real tokenizers.
# `wham-200m-540` is the 200M transformer over the 540-token layout: the shape the engine's
# speed is measured on against the official code.
PRESETS: dict[str, WHAMConfig] = {
    "tiny": WHAMConfig.for_tokenizer(
        TamingConfig(image_size=(16, 16), n_embed=64, embed_dim=8, ch=32, ch_mult=(1, 1, 1),
                     num_res_blocks=1, attn_resolutions=(4,), z_channels=16),
        gpt_size="tiny",
    ),
    "tiny-vit": WHAMConfig.for_tokenizer(
        ViTConfig(image_size=(10, 18), patch_size=4, transf_dim=32, embedding_dim=8,
                  num_layers=1, head_size=16, vocab_size=64),
        gpt_size="tiny",
    ),
    "wham-200m": WHAMConfig.for_tokenizer(
        TamingConfig(image_size=(128, 128), n_embed=4096, embed_dim=256, ch=128,
                     ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                     z_channels=256),
        gpt_size="chinchilla-251M",
    ),
    "wham-200m-540": WHAMConfig.for_tokenizer(_VIT_540, gpt_size="chinchilla-251M"),
    "wham-1.6b": WHAMConfig.for_tokenizer(_VIT_540, gpt_size="wham-4kvocab-1.6b"),
}
