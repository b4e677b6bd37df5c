"""Where an export goes: a local folder, written whole or not at all, never among outputs.

An export is written into a hidden folder beside OUT and moved into place once complete:
a failed export leaves no half dataset, and an export it replaces stays until the new one
is whole. Refused: OUT on object storage, OUT that is a file, OUT inside an output root or
holding the one exported from (an export never writes among a run's outputs), and a
non-empty OUT unless `overwrite`, which replaces only a folder holding an earlier export and
nothing else (LeRobot's `meta/info.json` beside its `data/` and `videos/`, or the
`state.json` of `datasets.save_to_disk` beside its Arrow files), never any other folder: a
home folder that happens to hold a `state.json` is not an export.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError

#: An earlier export, as (the file that marks it, every name its top level may hold): LeRobot
#: v3.0 and Hugging Face `datasets.save_to_disk`.
EXPORT_LAYOUTS = (
    ("meta/info.json", re.compile(r"^(?:meta|data|videos|images)$")),
    ("state.json", re.compile(r"^(?:state\.json|dataset_info\.json|"
                              r"data-\d{5}-of-\d{5}\.arrow)$")),
)


def _is_output_root(folder: Path) -> bool:
    return (folder / layout.RUNS_DIR).is_dir()


def _is_export(folder: Path) -> bool:
    """Whether `folder` holds one earlier export and nothing else."""
    names = [p.name for p in folder.iterdir()]
    return any((folder / marker).is_file() and all(allowed.match(n) for n in names)
               for marker, allowed in EXPORT_LAYOUTS)


def check_target(out: str, *, root: str, overwrite: bool = False) -> Path:
    """The resolved folder an export may be written to; UserError saying why not."""
    if "://" in out:
        raise UserError(f"{out}: an export is written to a local folder; copy it to object "
                        "storage afterwards")
    target = Path(out).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise UserError(f"{out} is a file; export into a new folder")
    inside = next((f for f in (target, *target.parents) if _is_output_root(f)), None)
    if inside is not None:
        where = "an output root" if inside == target else f"inside the output root {inside}"
        raise UserError(f"{out} is {where}; an export never writes among a run's outputs: "
                        "choose a folder outside it")
    if "://" not in root and target in Path(root).expanduser().resolve().parents:
        raise UserError(f"{out} holds the output root {root}; choose a folder outside it")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; export into a new folder, or pass "
                            "--overwrite to replace the export there")
        if not _is_export(target):
            raise UserError(f"{out} holds files that are not a dataset export; --overwrite "
                            "replaces only an earlier export: choose a new folder")
    return target


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A new hidden folder beside `target` to write into; when the block ends without an
    error it becomes `target` (replacing what was there), otherwise it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / "export")
    stage.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
