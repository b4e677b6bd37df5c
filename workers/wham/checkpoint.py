"""Official WHAM Lightning checkpoints (.ckpt), read without running any pickled code.

A ``.ckpt`` is a torch zip archive: ``<name>/data.pkl`` (a pickle) plus one raw file per tensor
storage under ``<name>/data/``. The pickle names classes of the reference code
(``humanmodelling.*`` / ``wham.*``) and Lightning; unpickling it normally would import and run
them. Here a restricted unpickler resolves every global itself: a few known-safe builtins and
tensor rebuild functions are real; every other class or function (the reference code's,
Lightning's, numpy's, ...) becomes an inert stand-in that only records its arguments; names
from modules that only an attack would use (``os``, ``subprocess``, ``builtins.eval``, ...)
make the load fail with a clear error. Nothing is ever imported or called.

Tensors stay lazy (storage key, dtype, offset, size, stride) until the weights are copied
into the model, so optimizer state in the file is never read. The state dict is the source of
truth; hyperparameters (``model_spec`` dicts) only fill in what shapes cannot tell (the
transformer's head count, the images' size, the ViT head size).
"""

from __future__ import annotations

import _compat_pickle
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .actions import ACTION_DIM, ACTION_VOCAB_SIZE
from .config import GPT_SIZES, GPTConfig
from .errors import CheckpointError
from .model import WHAMConfig, WHAMModel, empty_model, save_native
from .taming_vqgan import TamingConfig
from .vit_vqgan import ViTConfig

log = logging.getLogger(__name__)

GPT_PREFIX = "predictor.gpt_model."
TOKENIZER_PREFIX = "context_encoders.images."
# Modules whose names only appear in a pickle that wants to run code; a checkpoint naming one
# is refused outright. Every other unknown name loads as an inert stand-in, which is what keeps
# loading safe (this list only turns an attack into a clear error).
REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
    "code", "codeop", "ctypes", "multiprocessing", "pickle", "_pickle", "marshal", "webbrowser",
    "operator", "pdb", "bdb", "timeit", "platform", "asyncio", "threading", "signal", "urllib",
    "http", "ftplib", "smtplib", "tempfile", "glob", "zipimport", "pkgutil", "inspect", "io",
    "_io", "pathlib_abc", "shelve", "dbm", "sqlite3", "ssl", "select", "selectors", "resource",
})
SAFE_BUILTINS = {
    "set": set, "frozenset": frozenset, "slice": slice, "range": range, "complex": complex,
    "bytearray": bytearray, "bytes": bytes, "int": int, "float": float, "str": str,
    "bool": bool, "tuple": tuple, "list": list, "dict": dict,
}
# Buffers of the reference modules that are masks, not weights.
_MASK_KEYS = re.compile(r"(^transformer\.h\.\d+\.attn\.bias$)|(\.attn\.attn_mask$)")
_TRAINING_ONLY = ("patch_gan.", "target_patchgan.", "lpips_model.")
_MAX_WALK = 200_000


class _Inert:
    """Stand-in for a class or function named in the pickle; records what it was given."""

    pickled_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were recorded by __new__."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _LazyStorage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _LazyTensor:
    """A tensor not read yet: (storage, offset, size, stride) as pickled by torch.save."""

    def __init__(self, storage: _LazyStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset = storage, int(offset)
        self.shape, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        self.reader: _ArchiveReader | None = None

    def materialize(self) -> torch.Tensor:
        assert self.reader is not None
        return self.reader.tensor(self)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> Any:
    if not isinstance(storage, _LazyStorage):
        return _Inert(storage, offset, size, stride)
    return _LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    """Tensors saved with Python-side state wrap the plain rebuild; unwrap it."""
    if func is _rebuild_tensor and isinstance(args, tuple):
        return func(*args)
    return _Inert(func, args)


def _storage_types() -> dict[str, _StorageType]:
    names = {
        "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
        "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
        "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
        "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
        "UntypedStorage": torch.uint8,
    }
    return {name: _StorageType(dtype) for name, dtype in names.items()}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.storage_types = _storage_types()
        self.inert_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # torch.save writes protocol 2, which spells Python 3 modules the Python 2 way
        # (``__builtin__.eval``); map them back as the standard unpickler would.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name.startswith("_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type
        if module in ("torch", "torch.storage") and name in self.storage_types:
            return self.storage_types[name]
        if module == "builtins":
            if name in SAFE_BUILTINS:
                return SAFE_BUILTINS[name]
            raise CheckpointError(f"{self.source}: refusing to load: the pickle calls {full}")
        if module.split(".")[0] in REFUSED_MODULES:
            raise CheckpointError(
                f"{self.source}: refusing to load: the pickle references {full}, which no WHAM "
                "checkpoint uses (it could run code)"
            )
        if full not in self.inert_classes:
            self.inert_classes[full] = type(name, (_Inert,), {"pickled_name": full})
        return self.inert_classes[full]

    def persistent_load(self, pid: Any) -> _LazyStorage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.source}: unsupported storage reference {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        return _LazyStorage(str(key), storage_type.dtype, int(numel))


class _ArchiveReader:
    """Reads tensor storages out of a torch zip archive on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            names = self.zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(
                f"{path}: not a readable PyTorch zip checkpoint (truncated or foreign file: {exc})"
            ) from exc
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: zip file without a torch data.pkl (foreign file)")
        self.prefix = pkl[0][: -len("data.pkl")]
        order = self.prefix + "byteorder"
        if order in names and self.zip.read(order).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

    def load_pickle(self) -> Any:
        try:
            with self.zip.open(self.prefix + "data.pkl") as fh:
                return _RestrictedUnpickler(fh, source=str(self.path)).load()
        except CheckpointError:
            raise
        except Exception as exc:  # any malformed pickle: report, never crash obscurely
            raise CheckpointError(f"{self.path}: corrupt checkpoint pickle ({exc})") from exc

    def tensor(self, lazy: _LazyTensor) -> torch.Tensor:
        storage = lazy.storage
        name = f"{self.prefix}data/{storage.key}"
        try:
            raw = self.zip.read(name)
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor data {name} ({exc})") from exc
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        if len(raw) != storage.numel * itemsize:
            raise CheckpointError(f"{self.path}: tensor data {name} has the wrong size")
        flat = torch.frombuffer(bytearray(raw), dtype=storage.dtype) if raw else torch.empty(
            0, dtype=storage.dtype)
        extent = lazy.offset + sum((s - 1) * st for s, st in zip(lazy.shape, lazy.stride,
                                                                   strict=True) if s > 0)
        if any(s == 0 for s in lazy.shape):
            return torch.empty(lazy.shape, dtype=storage.dtype)
        if lazy.offset < 0 or extent >= max(storage.numel, 1):
            raise CheckpointError(f"{self.path}: tensor view outside its storage {name}")
        view = torch.as_strided(flat, lazy.shape, lazy.stride, lazy.offset)
        # a view of a whole storage already owns its (copied) buffer: skip a second copy
        whole = lazy.offset == 0 and view.numel() == storage.numel and view.is_contiguous()
        return view if whole else view.clone()


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
        elif isinstance(item, _Inert):
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
            if not isinstance(value, _LazyTensor):
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
    if block % tokens_per_step:
        raise CheckpointError(
            f"{source}: {block} positions are not a whole number of {tokens_per_step}-token steps"
        )
    config = GPTConfig(
        n_layer=n_layer, n_head=GPT_SIZES[size][1], n_embd=n_embd, vocab_size=vocab,
        block_size=block, version=version, bias="transformer.h.0.attn.c_attn.bias" in gpt,
    )
    return config, size, block // tokens_per_step


def load_official(path: str | os.PathLike) -> WHAMModel:
    """Load an official WHAM Lightning checkpoint as a float32 CPU WHAMModel."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{source}: no such checkpoint file")
    reader = _ArchiveReader(path)
    top = reader.load_pickle()
    if not isinstance(top, dict) or "state_dict" not in top:
        raise CheckpointError(f"{source}: not a Lightning checkpoint (no 'state_dict')")
    hparams = top.get("hyper_parameters", {})
    gpt, tok = _split_state(top["state_dict"], source)
    for value in (*gpt.values(), *tok.values()):
        value.reader = reader
    if "vq_model.quantize.embedding.weight" in tok:
        tok_config = _taming_config(tok, hparams, source)
    elif "vq_vae._embedding.weight" in tok:
        tok_config = _vit_config(tok, hparams, source)
    else:
        raise CheckpointError(
            f"{source}: no image tokenizer weights under '{TOKENIZER_PREFIX}' (expected "
            "vq_model.quantize.embedding.weight or vq_vae._embedding.weight)"
        )
    tokens_per_step = tok_config.tokens_per_image + ACTION_DIM
    gpt_config, size, seq_len = _gpt_config(gpt, hparams, tokens_per_step=tokens_per_step,
                                            source=source)
    if gpt_config.vocab_size != tok_config.vocab_size + ACTION_VOCAB_SIZE:
        raise CheckpointError(
            f"{source}: transformer vocabulary {gpt_config.vocab_size} != image codes "
            f"{tok_config.vocab_size} + {ACTION_VOCAB_SIZE} action tokens"
        )
    config = WHAMConfig(gpt=gpt_config, tokenizer=tok_config, seq_len=seq_len, gpt_size=size)
    model = empty_model(config, model_id=path.stem)
    state = {f"gpt.{k}": v for k, v in gpt.items()}
    state.update({f"tokenizer.{k}": v for k, v in tok.items()})
    expected = set(model.native_state_dict()) | {"gpt.lm_head.weight"}
    ignored = sorted(set(state) - expected)
    if ignored:
        log.warning("%s: ignoring %d unused weights, e.g. %s", source, len(ignored), ignored[:3])
    model.load_native_state_dict({k: v for k, v in state.items() if k in expected},
                                 source=source)
    return model


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert an official .ckpt into a native folder; returns the folder."""
    return save_native(load_official(src), out_dir)
