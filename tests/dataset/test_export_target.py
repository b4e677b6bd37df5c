"""Where an export may go, checked without exporting anything: `--overwrite` replaces an
earlier export and nothing else, whatever marker files a folder happens to hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.contracts import layout
from pipeline.contracts.errors import UserError
from pipeline.export.target import check_target


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    (folder / layout.RUNS_DIR).mkdir(parents=True)
    return folder


def test_overwrite_never_takes_a_folder_that_only_holds_an_export_file(root, tmp_path):
    """A home folder with a `state.json` (many tools write one) or a project with a
    `meta/info.json` is not an export: --overwrite would have deleted all of it."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/id_ed25519").write_text("key")
    (home / "state.json").write_text("{}")
    project = tmp_path / "project"
    (project / "meta").mkdir(parents=True)
    (project / "meta/info.json").write_text("{}")
    (project / "notes.txt").write_text("mine")
    for folder in (home, project):
        with pytest.raises(UserError, match="not a dataset export"):
            check_target(str(folder), root=str(root), overwrite=True)


def test_overwrite_takes_an_earlier_export_of_either_format(root, tmp_path):
    lerobot = tmp_path / "lerobot"
    for name in ("meta/info.json", "data/chunk-000/file-000.parquet",
                 "videos/observation.image/chunk-000/file-000.mp4"):
        (lerobot / name).parent.mkdir(parents=True, exist_ok=True)
        (lerobot / name).write_text("")
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("state.json", "dataset_info.json", "data-00000-of-00002.arrow",
                 "data-00001-of-00002.arrow"):
        (hf / name).write_text("")
    for folder in (lerobot, hf):
        assert check_target(str(folder), root=str(root), overwrite=True) == folder.resolve()
        with pytest.raises(UserError, match="is not empty"):
            check_target(str(folder), root=str(root))
