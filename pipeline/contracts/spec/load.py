"""Reading a job YAML into a JobSpec: `--set` overrides and errors that name every bad field.

`load_spec` reads the YAML, makes its relative paths relative to the YAML's folder
(`pipeline.contracts.spec.paths`), applies `--set a.b=c` overrides (relative paths there: from the
current folder) and turns every problem into one `UserError` that lists each bad field by
its dotted path, with a close key name for a misspelt one; callers never see a traceback.
`spec_schema` is the JSON Schema of a job YAML (`wham-batch validate --schema`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.contracts.errors import UserError
from pipeline.contracts.spec.job import JobSpec
from pipeline.contracts.spec.paths import resolve_paths


def _field_path(loc: Iterable[Any], err_type: str) -> tuple[str, type[BaseModel] | None]:
    """Dotted YAML path of a pydantic error location, without union-member tags, and the
    section model the last key was looked up in."""
    loc = list(loc)
    model: type[BaseModel] | None = JobSpec
    parent: type[BaseModel] | None = None
    out: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out[-1:] = [f"{out[-1]}[{part}]"] if out else [f"[{part}]"]
        elif model is not None and part in model.model_fields:
            out.append(part)
            parent, model = model, _submodel(model.model_fields[part].annotation)
        elif err_type == "extra_forbidden" and i == len(loc) - 1:
            out.append(str(part))
            parent = model
    return ".".join(out) or "(top level)", parent


def _close_key(key: str, section: type[BaseModel] | None, path: str) -> str:
    """` (did you mean ...?)` for a misspelt key: a close name in its own section, else the
    same name in another section."""
    if section is not None:
        close = difflib.get_close_matches(key, list(section.model_fields), n=1, cutoff=0.6)
        if close:
            prefix = path.rpartition(".")[0]
            return f"; did you mean `{prefix + '.' if prefix else ''}{close[0]}`?"
    elsewhere = [f"{name}.{key}" for name, field in JobSpec.model_fields.items()
                 if (sub := _submodel(field.annotation)) is not None and key in sub.model_fields]
    return f"; did you mean `{elsewhere[0]}`?" if elsewhere else ""


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per bad field: `path: message`; alternatives of a union are merged."""
    by_path: dict[str, list[str]] = {}
    for err in exc.errors():
        path, section = _field_path(err["loc"], err["type"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            msg = ("unknown key" + (_close_key(key, section, path) or
                                    " (see `wham-batch validate --schema` for every key)"))
        else:
            msg = err["msg"].removeprefix("Value error, ")
        if msg not in by_path.setdefault(path, []):
            by_path[path].append(msg)
    return [f"{path}: {' or '.join(msgs)}" for path, msgs in by_path.items()]


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    """`a.b=c` strings -> (["a", "b"], value) with the value parsed as a YAML scalar."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise UserError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. rollouts.steps=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # e.g. `run.run_id={name}-x`: not YAML, meant literally
        if isinstance(value, dict) and all(v is None for v in value.values()):
            value = raw  # `{date}` reads as a YAML set; a template placeholder was meant
        parsed.append(([p.strip() for p in parts], value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for parts, value in parse_overrides(overrides):
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"--set {'.'.join(parts)}: {where} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def spec_from_data(data: Any, *, source: str = "job spec") -> JobSpec:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of sections (run, model, seeds, ...)")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(exc)
        raise UserError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> JobSpec:
    """Read a job YAML, apply `--set` overrides and validate it (UserError on any problem).

    Relative paths in the YAML are taken from the YAML's folder, those in overrides from the
    current folder; the spec holds them as absolute paths.
    """
    path = Path(path)
    data = read_spec_data(path)
    if isinstance(data, dict):
        resolve_paths(data, path.parent)
        data = resolve_paths(apply_overrides(data, overrides), Path.cwd())
    return spec_from_data(data, source=str(path))


def read_spec_data(path: Path) -> Any:
    """The YAML document of a job spec as plain data ({} for an empty file), paths as written."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read job spec {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply to be a job spec") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    return {} if data is None else data


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def spec_schema() -> dict[str, Any]:
    """The JSON Schema of a job YAML, with every field's description and default."""
    schema = JobSpec.model_json_schema()
    schema["title"] = "wham-batch job spec"
    return schema
