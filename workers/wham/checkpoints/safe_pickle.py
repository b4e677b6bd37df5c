"""Read torch zip archives (``torch.save`` files) without running pickled code.

A torch archive holds ``<name>/data.pkl`` (a pickle) and one raw file per tensor storage under
``<name>/data/``. ``TorchZipReader.load_pickle`` unpickles with a restricted unpickler that
resolves every global itself: a few known-safe builtins and the tensor rebuild functions are
real; every other class or function (a training codebase's, Lightning's, numpy's, ...) becomes
an ``Inert`` stand-in that only records its arguments; names from modules that only an attack
would use (``os``, ``subprocess``, ``builtins.eval``, ...) make the load fail with a clear
error. Nothing is ever imported or called. Tensors come back as ``LazyTensor`` and are read
from the archive only when materialised, so unused entries (optimizer state) are never read.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from workers.wham.errors import CheckpointError

# Modules whose names only appear in a pickle that wants to run code; a checkpoint naming one
# is refused outright. Every other unknown name loads as an inert stand-in, which is what keeps
# loading safe (this list only turns an attack into a clear error).
REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
    "code", "codeop", "ctypes", "multiprocessing", "pickle", "_pickle", "marshal", "webbrowser",
    "operator", "pdb", "bdb", "timeit", "platform", "asyncio", "threading", "signal", "urllib",
    "http", "ftplib", "smtplib", "tempfile", "glob", "zipimport", "pkgutil", "inspect", "io",
    "_io", "shelve", "dbm", "sqlite3", "ssl", "select", "selectors", "resource",
})
# Builtins that only an attack would name; other builtins outside SAFE_BUILTINS are inert.
REFUSED_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "print",
    "type", "super", "object", "memoryview", "execfile", "reload", "apply", "file",
})
# Builtins that are called for real: cheap constructors that cannot run code or allocate
# unboundedly. (No `range`: list(range(2**40)) would build a huge list from a few bytes.)
SAFE_BUILTINS = {
    "slice": slice, "complex": complex, "int": int, "float": float, "str": str, "bool": bool,
    "dict": dict,
}
# Containers called for real only on a list or tuple the pickle already built (how pickle
# spells a set: set([...])), so their size is bounded by the pickle's own.
SAFE_CONTAINERS = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list}


class Inert:
    """Stand-in for a class or function named in the pickle; records what it was given."""

    pickled_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
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


class LazyStorage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class LazyTensor:
    """A tensor not read yet: (storage, offset, size, stride) as pickled by torch.save."""

    def __init__(self, storage: LazyStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset = storage, int(offset)
        self.shape, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        self.reader: TorchZipReader | None = None

    def materialize(self) -> torch.Tensor:
        assert self.reader is not None
        return self.reader.tensor(self)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> Any:
    if not isinstance(storage, LazyStorage):
        return Inert(storage, offset, size, stride)
    return LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    """Tensors saved with Python-side state wrap the plain rebuild; unwrap it."""
    if func is _rebuild_tensor and isinstance(args, tuple):
        return func(*args)
    return Inert(func, args)


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
        if module == "builtins" and name in SAFE_BUILTINS:
            return SAFE_BUILTINS[name]
        if module == "builtins" and name in SAFE_CONTAINERS:
            return self._container(SAFE_CONTAINERS[name])
        if module == "builtins" and name in REFUSED_BUILTINS:
            raise CheckpointError(f"{self.source}: refusing to load: the pickle calls {full}")
        if module.split(".")[0] in REFUSED_MODULES:
            raise CheckpointError(
                f"{self.source}: refusing to load: the pickle references {full}, which no WHAM "
                "checkpoint uses (it could run code)"
            )
        if full not in self.inert_classes:
            self.inert_classes[full] = type(name, (Inert,), {"pickled_name": full})
        return self.inert_classes[full]

    def _container(self, kind: type) -> Any:
        def build(*args: Any) -> Any:
            if not args:
                return kind()
            if len(args) == 1 and type(args[0]) in (list, tuple):
                return kind(args[0])
            given = ", ".join(getattr(a, "pickled_name", type(a).__name__) for a in args)
            raise CheckpointError(
                f"{self.source}: refusing to load: the pickle builds a {kind.__name__} from "
                f"({given}), not from a list or tuple it holds (it could exhaust memory)")

        return build

    def persistent_load(self, pid: Any) -> LazyStorage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.source}: unsupported storage reference {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        return LazyStorage(str(key), storage_type.dtype, int(numel))


class TorchZipReader:
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

    def tensor(self, lazy: LazyTensor) -> torch.Tensor:
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
