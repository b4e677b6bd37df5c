"""WHAMModel: an image tokenizer plus the GPT, with presets, random init and native files.

Native folder format (``FORMAT_VERSION`` 1): ``config.json`` (format name and version,
model id, transformer and tokenizer hyperparameters, weight fingerprint) and
``model.safetensors`` (keys ``gpt.<official GPT name>`` and ``tokenizer.<official tokenizer
name>``; ``gpt.lm_head.weight`` is not stored because it is tied to ``gpt.transformer.wte``).

``sha256`` is a canonical fingerprint of the weights: SHA-256 over the tensors sorted by
native key, each contributing its key, dtype, shape and raw little-endian bytes, computed on
the weights as loaded from the source (floating tensors hashed as float32, before any
``dtype`` cast). A converted checkpoint and the native folder written from it therefore share
a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .actions import ACTION_DIM, ACTION_VOCAB_SIZE
from .config import DEFAULT_SEQ_LEN, GPT_SIZES, GPTConfig
from .errors import CheckpointError
from .gpt import GPT
from .taming_vqgan import TamingConfig, TamingVQGAN
from .vit_vqgan import ViTConfig, ViTVQGAN

FORMAT_NAME = "wham-batch-native"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TIED_KEY = "gpt.lm_head.weight"

TokenizerConfig = TamingConfig | ViTConfig


@dataclass(frozen=True)
class WHAMConfig:
    """Everything needed to build a WHAMModel (weights aside)."""

    gpt: GPTConfig
    tokenizer: TokenizerConfig
    seq_len: int = DEFAULT_SEQ_LEN
    gpt_size: str | None = None  # the size name when it is one of GPT_SIZES

    @property
    def tokens_per_step(self) -> int:
        return self.tokenizer.tokens_per_image + ACTION_DIM

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
            kind = tok.pop("kind")
            tok_cls = {"taming": TamingConfig, "vit": ViTConfig}[kind]
            return cls(
                gpt=GPTConfig(**data["gpt"]),
                tokenizer=tok_cls(**tok),
                seq_len=int(data["seq_len"]),
                gpt_size=data.get("gpt_size"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{source}: bad model config ({type(exc).__name__}: {exc})"
            ) from exc


def build_config(
    tokenizer: TokenizerConfig,
    *,
    gpt_size: str,
    seq_len: int = DEFAULT_SEQ_LEN,
    version: int = 1,
    bias: bool = True,
) -> WHAMConfig:
    """Size the GPT for a tokenizer: vocab = V_img + 68, block = seq_len * tokens/step."""
    if gpt_size not in GPT_SIZES:
        raise CheckpointError(f"unknown transformer size {gpt_size!r}; known: {sorted(GPT_SIZES)}")
    n_layer, n_head, n_embd = GPT_SIZES[gpt_size]
    gpt = GPTConfig(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=tokenizer.vocab_size + ACTION_VOCAB_SIZE,
        block_size=seq_len * (tokenizer.tokens_per_image + ACTION_DIM),
        version=version,
        bias=bias,
    )
    return WHAMConfig(gpt=gpt, tokenizer=tokenizer, seq_len=seq_len, gpt_size=gpt_size)


# Real WHAM shapes. The transformer sizes are the reference table's; the tokenizers'
# hidden sizes are not published outside the checkpoints, so these are stand-ins with the
# published image sizes and token counts (1.6B: 300x180, patch 10 -> 540 tokens, 16K codes;
# 200M: 128x128 taming VQ-GAN). Load the real checkpoints for the real tokenizers.
PRESETS: dict[str, WHAMConfig] = {
    "tiny": build_config(
        TamingConfig(image_size=(16, 16), n_embed=64, embed_dim=8, ch=32, ch_mult=(1, 1, 1),
                     num_res_blocks=1, attn_resolutions=(4,), z_channels=16),
        gpt_size="tiny",
    ),
    "tiny-vit": build_config(
        ViTConfig(image_size=(10, 18), patch_size=4, transf_dim=32, embedding_dim=8,
                  num_layers=1, head_size=16, vocab_size=64),
        gpt_size="tiny",
    ),
    "wham-200m": build_config(
        TamingConfig(image_size=(128, 128), n_embed=4096, embed_dim=256, ch=128,
                     ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                     z_channels=256),
        gpt_size="chinchilla-251M",
    ),
    "wham-1.6b": build_config(
        ViTConfig(image_size=(180, 300), patch_size=10, transf_dim=768, embedding_dim=32,
                  num_layers=12, head_size=64, vocab_size=16384),
        gpt_size="wham-4kvocab-1.6b",
    ),
}


def _build_tokenizer(cfg: TokenizerConfig) -> nn.Module:
    return TamingVQGAN(cfg) if isinstance(cfg, TamingConfig) else ViTVQGAN(cfg)


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Canonical SHA-256 over (key, dtype, shape, bytes) of every tensor, sorted by key.

    Floating tensors are hashed as float32, so the fingerprint does not depend on the dtype
    the weights were stored in, only on their values.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu")
        t = (t.float() if t.is_floating_point() else t).contiguous()
        digest.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _materialize(value) -> torch.Tensor:
    return value.materialize() if hasattr(value, "materialize") else value


class WHAMModel(nn.Module):
    """The WHAM world model: ``tokenizer`` (image <-> tokens) and ``gpt`` (the transformer).

    The tokenizer always runs in float32 (it is small next to the GPT and the reference
    quantises in float32); ``dtype`` is the GPT's dtype.
    """

    def __init__(self, config: WHAMConfig, *, model_id: str) -> None:
        super().__init__()
        self.config = config
        self.model_id = model_id
        self.tokenizer = _build_tokenizer(config.tokenizer)
        self.gpt = GPT(config.gpt)
        self.sha256 = ""

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.tokenizer.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokenizer.tokens_per_image

    @property
    def tokens_per_step(self) -> int:
        return self.config.tokens_per_step

    @property
    def image_vocab_size(self) -> int:
        return self.config.tokenizer.vocab_size

    @property
    def device(self) -> torch.device:
        return self.gpt.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.transformer.wte.weight.dtype

    def encode_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B, T, 3, H, W) -> LongTensor (B, T, tokens_per_image) on ``device``."""
        return self.tokenizer.encode(images)

    def decode_tokens(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """Image tokens (B, T, n) -> uint8 ndarray (B, T, 3, H, W) on the CPU."""
        return self.tokenizer.decode(tokens).cpu().numpy()

    def native_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under native keys, without the tied head."""
        state = {f"gpt.{k}": v for k, v in self.gpt.state_dict().items()}
        state.pop(TIED_KEY, None)
        state.update({f"tokenizer.{k}": v for k, v in self.tokenizer.state_dict().items()})
        return state

    def load_native_state_dict(self, state: dict, *, source: str) -> None:
        """Copy weights in (shapes checked); raises CheckpointError naming what is wrong.

        Values are tensors or lazy tensors (with ``.shape`` and ``materialize()``), so a large
        checkpoint is read one tensor at a time. A stored ``gpt.lm_head.weight`` must equal the
        embedding it is tied to.
        """
        own = self.native_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own) - {TIED_KEY})
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: weights do not match the model config: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        for key, target in own.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{source}: weight {key} has shape {tuple(state[key].shape)}, "
                    f"the config needs {tuple(target.shape)}"
                )
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(_materialize(state[key]))
            if TIED_KEY in state and not torch.equal(
                _materialize(state[TIED_KEY]).to(self.gpt.lm_head.weight.dtype),
                self.gpt.lm_head.weight,
            ):
                raise CheckpointError(
                    f"{source}: lm_head.weight differs from transformer.wte.weight; only "
                    "tied heads are supported"
                )
        self.sha256 = weights_fingerprint(self.native_state_dict())

    def place(self, *, device: torch.device | str, dtype: torch.dtype | None) -> WHAMModel:
        """Move to ``device``; cast the GPT (only) to ``dtype`` when given."""
        self.tokenizer.to(device=device, dtype=torch.float32)
        if dtype is None:
            self.gpt.to(device=device)
        else:
            self.gpt.to(device=device, dtype=dtype)
        return self.eval()


def empty_model(config: WHAMConfig, *, model_id: str) -> WHAMModel:
    """A CPU model with uninitialised weights, for loaders that overwrite every weight.

    Skipping the random initialisers saves seconds on real-size models.
    """
    with torch.device("meta"):
        model = WHAMModel(config, model_id=model_id)
    model.to_empty(device="cpu")
    model.gpt.lm_head.weight = model.gpt.transformer.wte.weight
    return model


def random_model(
    preset: str, *, seed: int = 0, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> WHAMModel:
    """A model with random weights for a named preset; the same seed gives the same weights."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
    generator = torch.Generator().manual_seed(seed)
    model = empty_model(PRESETS[preset], model_id=f"preset:{preset}")
    model.gpt.reset_parameters(generator)
    with torch.no_grad():
        for name, p in model.tokenizer.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            else:  # conv/linear/embedding weights, scaled by fan-in so activations stay O(1)
                fan_in = max(1, p[0].numel()) if p.ndim > 2 else p.shape[-1]
                p.normal_(0.0, fan_in**-0.5, generator=generator)
    model.sha256 = weights_fingerprint(model.native_state_dict())
    return model.place(device=device, dtype=dtype)


def save_native(model: WHAMModel, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir`` (created if needed)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.native_state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_id": model.model_id,
        "weights_sha256": weights_fingerprint(state),
        **model.config.to_dict(),
    }
    tmp_weights = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp_weights), metadata={"format": FORMAT_NAME})
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    tmp_config = out / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_config, out / CONFIG_FILE)
    return out


def _load_native(
    folder: Path, *, device: str | torch.device, dtype: torch.dtype | None
) -> WHAMModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{folder}: not a native model folder ({path.name} is missing)")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path}: not a {FORMAT_NAME} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    config = WHAMConfig.from_dict(meta, source=str(config_path))
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from exc
    model = empty_model(config, model_id=str(meta.get("model_id") or folder.name))
    model.load_native_state_dict(state, source=str(weights_path))
    expected = meta.get("weights_sha256")
    if expected and expected != model.sha256:
        raise CheckpointError(
            f"{weights_path}: weights fingerprint {model.sha256[:12]}... does not match "
            f"config.json ({str(expected)[:12]}...); the folder is corrupt or mixed"
        )
    return model.place(device=device, dtype=dtype)


def load_model(
    source: str | os.PathLike, *, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> WHAMModel:
    """Load a native folder (config.json + model.safetensors) or an official Lightning .ckpt."""
    path = Path(source)
    if path.is_dir():
        return _load_native(path, device=device, dtype=dtype)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    from .checkpoint import load_official

    return load_official(path).place(device=device, dtype=dtype)
