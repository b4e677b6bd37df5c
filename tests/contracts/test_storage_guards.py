"""Storage that cannot be trusted or written: symlinks planted inside a local root, a disk
that fills up or turns read-only, oversized objects, endpoint URLs with secrets, backoff."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from support.smallfs import run_with_small_fs

from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import (
    LocalStorage,
    StorageFatalError,
    backoff_delay,
    check_s3_endpoint,
    open_storage,
    read_uri,
)


def outside_files(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "outside").rglob("*"))


@pytest.fixture
def planted(tmp_path: Path) -> LocalStorage:
    """A root whose `frames/run` folder is a symlink to a folder outside it, which holds a
    file of its own."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious.txt").write_text("keep me")
    storage = LocalStorage(tmp_path / "root")
    storage.put_bytes("frames/keep.txt", b"inside")
    os.symlink(tmp_path / "outside", tmp_path / "root" / "frames" / "run")
    return storage


def test_writes_never_go_through_a_symlink(tmp_path: Path, planted: LocalStorage) -> None:
    for write in (lambda: planted.put_bytes("frames/run/a/000000.png", b"png"),
                  lambda: planted.create_if_absent("frames/run/marker.json", b"{}")):
        with pytest.raises(StorageFatalError, match="refusing to write through the symbolic "
                           "link .*frames/run inside the output root"):
            write()
    assert outside_files(tmp_path) == ["outside/precious.txt"]


def test_deletes_and_listings_never_follow_a_symlink(tmp_path: Path,
                                                     planted: LocalStorage) -> None:
    assert list(planted.list_keys("frames/run/")) == []  # a linked folder is not listed
    assert planted.delete_prefix("frames/run") == 0
    assert planted.delete_prefix("frames/") == 1  # frames/keep.txt only
    with pytest.raises(StorageFatalError, match="refusing to delete through"):
        planted.delete("frames/run/precious.txt")
    assert outside_files(tmp_path) == ["outside/precious.txt"]
    # a link at a file's own name is replaced by the file, not written through
    os.symlink(tmp_path / "outside" / "precious.txt", tmp_path / "root" / "frames" / "f.txt")
    planted.put_bytes("frames/f.txt", b"new")
    assert (tmp_path / "outside" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "root" / "frames" / "f.txt").is_symlink()


def test_a_root_that_is_itself_a_link_is_the_users_choice(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "root")
    LocalStorage(tmp_path / "root").put_bytes("a/b.txt", b"x")
    assert (tmp_path / "real" / "a" / "b.txt").read_bytes() == b"x"


FILL = """
import json, sys
from pipeline.contracts.storage import LocalStorage, StorageFatalError
storage = LocalStorage(sys.argv[1])
out = {}
try:
    for i in range(10_000):
        storage.put_bytes(f"frames/run/{i:06d}.png", bytes(4096))
except StorageFatalError as exc:
    out["full"] = str(exc)
    out["written"] = i
print(json.dumps(out))
"""

READ_ONLY = """
import json, sys
from pipeline.contracts.storage import LocalStorage, StorageFatalError
storage = LocalStorage(sys.argv[1])
out = {"kept": storage.get_bytes("a.txt").decode()}
for name, write in (("put", lambda: storage.put_bytes("b.txt", b"x")),
                    ("create", lambda: storage.create_if_absent("c.txt", b"x")),
                    ("delete", lambda: storage.delete("a.txt"))):
    try:
        write()
    except StorageFatalError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


def test_a_full_disk_is_a_clear_error_naming_the_root(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    script = f"{sys.executable} -c '{FILL}' {mount}/out"
    done = run_with_small_fs(mount, script, size_kb=64)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert 0 < result["written"] <= 16  # 64 KiB hold at most 16 files of 4 KiB
    assert f"output root {mount}/out is full" in result["full"]
    assert "rerun the same command to resume" in result["full"]


def test_a_read_only_disk_is_a_clear_error_naming_the_root(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    script = (f"mkdir {mount}/out && echo keep > {mount}/out/a.txt && "
              f"mount -o remount,ro {mount} && {sys.executable} -c '{READ_ONLY}' {mount}/out")
    done = run_with_small_fs(mount, script, size_kb=64)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kept"] == "keep\n"
    for name in ("put", "create", "delete"):
        assert f"output root {mount}/out is on a read-only file system" in result[name]


def test_reads_of_big_objects_are_bounded(tmp_path: Path, s3_bucket: str) -> None:
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as fh:
        fh.truncate(5 * 2**30)  # 5 GiB that take no disk
    with pytest.raises(UserError, match=r"huge.png is 5120.0 MiB, more than the 1 MiB"):
        read_uri(str(sparse), max_bytes=2**20)
    s3 = open_storage(s3_bucket)
    s3.put_bytes("big.bin", bytes(3 * 2**20))
    with pytest.raises(UserError, match=r"big.bin is 3.0 MiB, more than the 2 MiB"):
        s3.get_bytes("big.bin", max_bytes=2 * 2**20)
    assert len(s3.get_bytes("big.bin", max_bytes=3 * 2**20)) == 3 * 2**20


@pytest.mark.parametrize("url, ok", [
    ("http://127.0.0.1:9000", True), ("https://s3.example.com/", True),
    ("http://user:pw@host:9000", True),  # user:password is dropped, as before
    ("http://host:9000/?token=SECRET", False), ("http://host/#SECRET", False),
    ("ftp://host", False), ("http://host:99999", False), ("host:9000", False),
])
def test_endpoint_urls(url: str, ok: bool) -> None:
    if ok:
        assert check_s3_endpoint(url) == url
        return
    with pytest.raises(UserError) as err:
        check_s3_endpoint(url)
    assert "SECRET" not in str(err.value)


def test_backoff_grows_and_spreads() -> None:
    delays = [[backoff_delay(a) for a in range(4)] for _ in range(50)]
    for attempt in range(4):
        values = [d[attempt] for d in delays]
        assert 0.25 * 2**attempt <= min(values) <= max(values) <= 0.5 * 2**attempt
        assert len(set(values)) > 1  # jittered
    assert backoff_delay(30) <= 30.0


def test_a_conditional_write_where_no_file_can_be_is_refused_by_name(tmp_path: Path) -> None:
    """A folder, a pipe or a link standing at a key: a conditional create said "taken"
    (the caller then looked for an object that reads as absent, over and over), and a
    replace of a link said "try again"."""
    storage = LocalStorage(tmp_path / "root")
    storage.put_bytes("a/keep.txt", b"x")
    (tmp_path / "outside.json").write_text("{}")
    (tmp_path / "root/a/folder").mkdir()
    os.mkfifo(tmp_path / "root/a/pipe")
    os.symlink(tmp_path / "nowhere", tmp_path / "root/a/dangling")
    os.symlink(tmp_path / "outside.json", tmp_path / "root/a/link")
    for name, said in (("folder", "a/folder is not a file"), ("pipe", "a/pipe is not a file"),
                       ("dangling", "symbolic link .*a/dangling"),
                       ("link", "symbolic link .*a/link")):
        key = f"a/{name}"
        for write, kwargs in ((storage.create_if_absent, {"data": b"{}"}),
                              (storage.put_if, {"data": b"{}", "match": "0" * 64}),
                              (storage.delete_if, {"match": "0" * 64})):
            with pytest.raises(StorageFatalError, match=said):
                write(key, **kwargs)
    assert (tmp_path / "outside.json").read_text() == "{}"
