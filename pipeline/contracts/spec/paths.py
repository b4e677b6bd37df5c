"""The paths in a job spec: what a relative one means, and whether the local ones exist.

A relative path written in a job YAML is relative to the folder of that YAML, so a config
means the same files from whatever folder a command runs in: `output.root: ../out/demo` in
`configs/demo.yaml` is `<project>/out/demo` everywhere. A relative path given on the command
line (`--set output.root=out/x`) is relative to the current folder, as a shell user expects.
Both are made absolute when the spec is loaded; `s3://` (any `scheme://`) URIs are left as
they are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Every field of a job spec that names a file or folder, as dotted YAML paths.
PATH_FIELDS = ("model.checkpoint", "seeds.source", "rollouts.actions.path", "output.root")
#: The fields a job reads from (the rest, output.root, it writes to).
INPUT_FIELDS = ("model.checkpoint", "seeds.source", "rollouts.actions.path")


def is_uri(value: str) -> bool:
    """True for `s3://...` and other `scheme://` locations (never relative to a folder)."""
    return "://" in value


def get_field(data: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path of nested mappings; None where the path does not lead."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _set_field(data: dict[str, Any], dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value


def relative_paths(data: Mapping[str, Any]) -> dict[str, str]:
    """The path fields of raw spec data that hold a local relative path: field -> value."""
    out = {}
    for name in PATH_FIELDS:
        value = get_field(data, name)
        if isinstance(value, str) and value and not is_uri(value) \
                and not Path(value).expanduser().is_absolute():
            out[name] = value
    return out


def absolute(value: str, base: Path) -> str:
    """`value` (a local path, maybe relative or with ~) as an absolute path from `base`."""
    return os.path.normpath(os.path.join(os.path.abspath(base), os.path.expanduser(value)))


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the local paths of raw spec data absolute (relative ones against `base`)."""
    for name in PATH_FIELDS:
        value = get_field(data, name)
        if isinstance(value, str) and value and not is_uri(value):
            _set_field(data, name, absolute(value, base))
    return data


def missing_local_paths(spec: Any) -> list[str]:
    """One line per local input that does not exist, or output root that is not a folder.

    `spec` is a JobSpec; `s3://` locations are not looked at (see `remote_paths`).
    """
    data = spec.model_dump()
    problems = []
    for name in PATH_FIELDS:
        value = get_field(data, name)
        if not isinstance(value, str) or is_uri(value):
            continue
        path = Path(value)
        if name in INPUT_FIELDS and not path.exists():
            problems.append(f"{name}: {value} does not exist")
        elif name == "output.root" and path.exists() and not path.is_dir():
            problems.append(f"{name}: {value} exists and is not a folder")
    return problems


def remote_paths(spec: Any) -> list[str]:
    """The path fields of a JobSpec that name `scheme://` locations."""
    data = spec.model_dump()
    return [name for name in PATH_FIELDS
            if isinstance(get_field(data, name), str) and is_uri(get_field(data, name))]
