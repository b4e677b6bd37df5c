"""The checkpoint cache: private to its user, and shared safely by the actors of one node
that fetch the same checkpoint at once."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import open_storage
from workers.actor.replica import _publish, fetch_checkpoint


def _upload_folder(s3_bucket: str) -> str:
    store = open_storage(s3_bucket)
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"weights")):
        store.put_bytes(f"models/m1/{name}", data)
    return f"{s3_bucket}/models/m1"


def test_a_checkpoint_folder_lands_in_a_private_cache(tmp_path, monkeypatch, s3_bucket):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WHAM_CACHE_DIR", str(cache))
    uri = _upload_folder(s3_bucket)
    path = Path(fetch_checkpoint(uri, endpoint_url=None, region=None))
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert fetch_checkpoint(uri, endpoint_url=None, region=None) == str(path)  # cached
    assert [p.name for p in path.parent.iterdir()] == ["m1"]  # no copy left behind


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_folder_of_another_user_is_refused(tmp_path, monkeypatch, s3_bucket):
    cache = tmp_path / "theirs"
    cache.mkdir()
    os.chown(cache, 4242, -1)
    monkeypatch.setenv("WHAM_CACHE_DIR", str(cache))
    with pytest.raises(UserError, match=f"cache folder {cache} belongs to another user"):
        fetch_checkpoint(_upload_folder(s3_bucket), endpoint_url=None, region=None)
    assert not list(cache.iterdir())


def _copy(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(text)
    return folder


def test_a_copy_that_lost_the_race_gives_way(tmp_path):
    # Another actor of the node renamed its copy into place first: a folder cannot replace
    # a non-empty one, so this copy is dropped and theirs is used.
    dest = _copy(tmp_path / "m1", "first")
    mine = _copy(tmp_path / "m1.partial-123", "second")
    _publish(str(mine), str(dest))
    assert not mine.exists()
    assert (dest / "model.safetensors").read_text() == "first"
    # a single file simply replaces the one there (the same bytes)
    (tmp_path / "w.ckpt").write_text("first")
    (tmp_path / "w.ckpt.partial-9").write_text("second")
    _publish(str(tmp_path / "w.ckpt.partial-9"), str(tmp_path / "w.ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1", "w.ckpt"]


def test_a_failed_rename_with_nothing_in_place_is_not_hidden(tmp_path):
    with pytest.raises(FileNotFoundError):
        _publish(str(tmp_path / "gone.partial-1"), str(tmp_path / "gone"))
