"""Official WHAM Lightning checkpoints (.ckpt), read without running any pickled code.

The archive is unpickled by `safe_pickle` (the reference code's classes named in the
hyperparameters load as inert stand-ins; nothing is imported or called) and tensors stay lazy
until they are copied into the model, so optimizer state in the file is never read. The
state dict is the source of truth; hyperparameters (``model_spec`` dicts) only fill in what
shapes cannot tell (the transformer's head count, the image size, the ViT head size).
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.wham.actions import ACTION_DIM, ACTION_VOCAB_SIZE
from workers.wham.checkpoints.native import model_for_weights, parameter_shapes
from workers.wham.checkpoints.safe_pickle import Inert, LazyTensor, TorchZipReader
from workers.wham.config import GPT_SIZES, WHAMConfig, check_tokenizer, gpt_config_for
from workers.wham.errors import CheckpointError
from workers.wham.model import WHAMModel
from workers.wham.tokenizers import TamingConfig, ViTConfig

log = logging.getLogger(__name__)

GPT_PREFIX = "predictor.gpt_model."
TOKENIZER_PREFIX = "context_encoders.images."
# Buffers of the reference modules that are masks, not weights.
_MASK_KEYS = re.compile(r"(^transformer\.h\.\d+\.attn\.bias$)|(\.attn\.attn_mask$)")
_TRAINING_ONLY = ("patch_gan.", "target_patchgan.", "lpips_model.")
_MAX_WALK = 200_000


def _walk(obj: Any) -> Iterator[dict]:
    """Every dict reachable from obj (through containers and inert objects), breadth first."""
    queue, seen = deque([obj]), set()
    while queue and len(seen) < _MAX_WALK:
        item = queue.popleft()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            yield item
            queue.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            queue.extend(item)
        elif isinstance(item, Inert):
            queue.extend([item.items, item.kwargs, item.state, *item.args, *item.list])


def _find_spec(hparams: Any, *keys: str) -> dict:
    for d in _walk(hparams):
        if all(k in d for k in keys):
            return d
    return {}


def _split_state(state: Any, source: str) -> tuple[dict, dict]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: 'state_dict' is not a mapping")
    gpt, tok = {}, {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        if key.startswith(GPT_PREFIX):
            gpt[key[len(GPT_PREFIX):]] = value
        elif key.startswith(TOKENIZER_PREFIX):
            tok[key[len(TOKENIZER_PREFIX):]] = value
    for part in (gpt, tok):
        for key in [k for k in part if _MASK_KEYS.search(k) or k.startswith(_TRAINING_ONLY)]:
            del part[key]
        for key, value in part.items():
            if not isinstance(value, LazyTensor):
                raise CheckpointError(f"{source}: state_dict entry {key} is not a tensor")
    if "transformer.wte.weight" not in gpt:
        raise CheckpointError(
            f"{source}: no transformer weights ({GPT_PREFIX}transformer.wte.weight is missing)"
        )
    return gpt, tok


def _count(keys: Any, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _need(spec: dict, key: str, what: str, source: str) -> Any:
    if key not in spec:
        raise CheckpointError(
            f"{source}: cannot tell the {what}: the hyperparameters have no '{key}' "
            "and the weights do not determine it"
        )
    return spec[key]


def _taming_config(tok: dict, hparams: Any, source: str) -> TamingConfig:
    n_embed, embed_dim = tok["vq_model.quantize.embedding.weight"].shape
    spec = _find_spec(hparams, "taming_n_embed")
    dd = spec.get("taming_ddconfig") if isinstance(spec.get("taming_ddconfig"), dict) else None
    if dd is not None:
        res = int(dd["resolution"])
        return TamingConfig(
            image_size=(res, res), n_embed=n_embed, embed_dim=embed_dim, ch=int(dd["ch"]),
            ch_mult=tuple(dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=tuple(dd["attn_resolutions"]), z_channels=int(dd["z_channels"]),
            in_channels=int(dd.get("in_channels", 3)), out_ch=int(dd.get("out_ch", 3)),
            double_z=bool(dd.get("double_z", False)), resolution=res,
        )
    if "vq_model.encoder.conv_in.weight" not in tok:
        raise CheckpointError(f"{source}: taming encoder weights are missing")
    ch, in_channels = tok["vq_model.encoder.conv_in.weight"].shape[:2]
    levels = _count(tok, r"vq_model\.encoder\.down\.(\d+)\.")
    blocks = _count(tok, r"vq_model\.encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = tuple(tok[f"vq_model.encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch
                    for i in range(levels))
    per_axis = int(_need(spec, "taming_num_indices_per_axis", "image size", source))
    res = per_axis * 2 ** (levels - 1)
    z_channels = tok["vq_model.quant_conv.weight"].shape[1]
    return TamingConfig(
        image_size=(res, res), n_embed=n_embed, embed_dim=embed_dim, ch=ch, ch_mult=ch_mult,
        num_res_blocks=blocks, z_channels=z_channels, in_channels=in_channels,
        out_ch=tok["vq_model.decoder.conv_out.weight"].shape[0], resolution=res,
        attn_resolutions=tuple(res // 2**i for i in range(levels)
                               if f"vq_model.encoder.down.{i}.attn.0.norm.weight" in tok),
        double_z=tok["vq_model.encoder.conv_out.weight"].shape[0] == 2 * z_channels,
    )


def _vit_config(tok: dict, hparams: Any, source: str) -> ViTConfig:
    spec = _find_spec(hparams, "patch_size", "transf_dim")
    size = _find_spec(hparams, "image_size_per_x_axis", "image_size_per_y_axis")
    if "encoder.proj1.weight" not in tok or "encoder.output_proj.weight" not in tok:
        raise CheckpointError(f"{source}: ViT-VQGAN encoder weights are missing")
    transf_dim, patch_dim = tok["encoder.proj1.weight"].shape
    return ViTConfig(
        image_size=(int(_need(size, "image_size_per_y_axis", "image height", source)),
                    int(_need(size, "image_size_per_x_axis", "image width", source))),
        patch_size=round((patch_dim / 3) ** 0.5),
        transf_dim=transf_dim,
        embedding_dim=tok["encoder.output_proj.weight"].shape[0],
        num_layers=_count(tok, r"encoder\.vit\.(\d+)\."),
        head_size=int(_need(spec, "head_size", "ViT-VQGAN head count", source)),
        vocab_size=tok["vq_vae._embedding.weight"].shape[0],
    )


def _size_name(spec: dict, *, n_layer: int, n_embd: int, source: str) -> str:
    """The transformer's size name: from the hyperparameters, else the one size that fits."""
    size = spec.get("model_size")
    if size is None:
        matches = [n for n, (lay, _, emb) in GPT_SIZES.items() if (lay, emb) == (n_layer, n_embd)]
        if len(matches) != 1:
            raise CheckpointError(
                f"{source}: cannot tell the transformer's head count: no 'model_size' in the "
                f"hyperparameters and {len(matches)} known sizes have n_layer={n_layer}, "
                f"n_embd={n_embd}"
            )
        size = matches[0]
    if size not in GPT_SIZES:
        raise CheckpointError(f"{source}: unknown transformer model_size {size!r}")
    if GPT_SIZES[size][0] != n_layer or GPT_SIZES[size][2] != n_embd:
        raise CheckpointError(
            f"{source}: model_size {size!r} is {GPT_SIZES[size]} but the weights have "
            f"n_layer={n_layer}, n_embd={n_embd}"
        )
    return size


def _gpt_config(gpt: dict, hparams: Any, *, tokens_per_step: int, source: str):
    spec = _find_spec(hparams, "model_size")
    vocab, n_embd = gpt["transformer.wte.weight"].shape
    block = gpt["transformer.wpe.weight"].shape[0]
    n_layer = _count(gpt, r"transformer\.h\.(\d+)\.")
    version = 1 if "transformer.h.0.ln_1.weight" in gpt else 2
    if "nanogpt_version" in spec and int(spec["nanogpt_version"]) != version:
        raise CheckpointError(
            f"{source}: hyperparameters say nanogpt_version {spec['nanogpt_version']} but the "
            f"weights are version {version}"
        )
    size = _size_name(spec, n_layer=n_layer, n_embd=n_embd, source=source)
    if block % tokens_per_step:
        raise CheckpointError(
            f"{source}: {block} positions are not a whole number of {tokens_per_step}-token steps"
        )
    seq_len = block // tokens_per_step
    config = gpt_config_for(size, vocab_size=vocab, tokens_per_step=tokens_per_step,
                            seq_len=seq_len, version=version,
                            bias="transformer.h.0.attn.c_attn.bias" in gpt)
    return config, size, seq_len


def _config(gpt: dict, tok: dict, hparams: Any, source: str) -> WHAMConfig:
    """The model's config from the weights' shapes and the hyperparameters, within the
    limits (checked before anything is built); CheckpointError naming the file."""
    try:
        if "vq_model.quantize.embedding.weight" in tok:
            tok_config = _taming_config(tok, hparams, source)
        elif "vq_vae._embedding.weight" in tok:
            tok_config = _vit_config(tok, hparams, source)
        else:
            raise CheckpointError(
                f"{source}: no image tokenizer weights under '{TOKENIZER_PREFIX}' (expected "
                "vq_model.quantize.embedding.weight or vq_vae._embedding.weight)"
            )
        check_tokenizer(tok_config)
        tokens_per_step = tok_config.tokens_per_image + ACTION_DIM
        gpt_config, size, seq_len = _gpt_config(gpt, hparams, tokens_per_step=tokens_per_step,
                                                source=source)
        if gpt_config.vocab_size != tok_config.vocab_size + ACTION_VOCAB_SIZE:
            raise CheckpointError(
                f"{source}: transformer vocabulary {gpt_config.vocab_size} != image codes "
                f"{tok_config.vocab_size} + {ACTION_VOCAB_SIZE} action tokens"
            )
        return WHAMConfig(gpt=gpt_config, tokenizer=tok_config, seq_len=seq_len, gpt_size=size)
    except CheckpointError as exc:
        if str(exc).startswith(source):
            raise
        raise CheckpointError(f"{source}: {exc}") from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise CheckpointError(
            f"{source}: bad hyperparameters ({type(exc).__name__}: {exc})") from None


def load_official(path: str | os.PathLike) -> WHAMModel:
    """Load an official WHAM Lightning checkpoint as a float32 CPU WHAMModel."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{source}: no such checkpoint file")
    reader = TorchZipReader(path)
    top = reader.load_pickle()
    if not isinstance(top, dict) or "state_dict" not in top:
        raise CheckpointError(f"{source}: not a Lightning checkpoint (no 'state_dict')")
    hparams = top.get("hyper_parameters", {})
    gpt, tok = _split_state(top["state_dict"], source)
    for value in (*gpt.values(), *tok.values()):
        value.reader = reader
    config = _config(gpt, tok, hparams, source)
    state = {f"gpt.{k}": v for k, v in gpt.items()}
    state.update({f"tokenizer.{k}": v for k, v in tok.items()})
    expected = set(parameter_shapes(config, source=source)) | {"gpt.lm_head.weight"}
    ignored = sorted(set(state) - expected)
    if ignored:
        log.warning("%s: ignoring %d unused weights, e.g. %s", source, len(ignored), ignored[:3])
    return model_for_weights(config, {k: v for k, v in state.items() if k in expected},
                             source=source, model_id=path.stem)
