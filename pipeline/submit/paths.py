"""Where a submitted job's paths land on the cluster, and refusing the ones that would vanish.

On the cluster a job runs in Ray's copy of what was uploaded (the project folder, or a
folder holding only the config), kept in a temporary folder of the Ray session. A relative
path resolves inside that copy there: outputs written to it are lost to the user, and an
input is found only if it was uploaded. So before anything is sent, every relative path of
the spec is checked:

- an input (checkpoint, seeds, action script) inside the uploaded project folder travels
  with it and resolves to the same files; one given with `--set` is re-sent relative to the
  project folder, which is where the job starts;
- anything else (`output.root`, inputs that are not uploaded) is refused with a message
  that says what to use: an absolute path every node shares, or an `s3://` URI. With
  `absolute_paths=True` (`wham-batch submit --absolute-paths`) it is sent as this machine's
  absolute path instead, for a cluster that shares this filesystem (a head started here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.contracts.errors import UserError
from pipeline.contracts.spec import JobSpec, apply_overrides
from pipeline.contracts.spec.load import read_spec_data
from pipeline.contracts.spec.paths import INPUT_FIELDS, PATH_FIELDS, get_field, relative_paths


def _inside(path: str, root: Path | None) -> str | None:
    """`path` relative to `root` (posix) when it lies inside it, else None."""
    if root is None:
        return None
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return None


def _refusal(name: str, raw: str, here: str) -> str:
    if name in INPUT_FIELDS:
        why = ("it is not uploaded with the job (outside the project folder, git-ignored or "
               "excluded), so the job would not find it")
    else:
        why = ("on the cluster it would resolve inside Ray's temporary copy of the upload, "
               "where the outputs would be lost to you")
    example = "s3://bucket/prefix" if name == "output.root" else "s3://bucket/key"
    return (f"{name}: {raw!r} is a relative path and {why}. Use an absolute path that every "
            f"node shares or an s3:// URI (--set {name}={example}), or pass --absolute-paths "
            f"to send {here} for a cluster that shares this machine's files (e.g. a head "
            "started on this machine)")


def cluster_overrides(config: Path, overrides: Iterable[str], spec: JobSpec, *,
                      upload_root: Path | None, uploaded: Callable[[str], bool],
                      absolute_paths: bool = False) -> list[str]:
    """`--set` items that make the spec's paths mean on the cluster what they mean here.

    `upload_root` is the project folder sent as the job's working folder (None when only the
    config travels); `uploaded(rel)` says whether a path relative to it is part of the
    upload. Raises a UserError naming every path that cannot work, unless `absolute_paths`.
    """
    written = relative_paths(read_spec_data(config))  # relative to the config's folder
    set_data = apply_overrides({}, list(overrides))
    given = relative_paths(set_data)  # relative to the current folder
    resolved = spec.model_dump()
    extra, refused = [], []
    for name in PATH_FIELDS:
        overridden = get_field(set_data, name) is not None
        raw = given.get(name) if overridden else written.get(name)
        if raw is None:
            continue
        here = get_field(resolved, name)
        rel = _inside(here, upload_root)
        if name in INPUT_FIELDS and rel is not None and Path(here).exists() and uploaded(rel):
            if name in given:
                extra.append(f"{name}={rel}")  # the job starts in the project folder
        elif absolute_paths:
            extra.append(f"{name}={here}")
        else:
            refused.append(_refusal(name, raw, here))
    if refused:
        raise UserError("paths that would not work on the cluster:\n  " + "\n  ".join(refused))
    return extra
