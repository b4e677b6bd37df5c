"""Storage against a real folder and a real S3 endpoint (moto on loopback)."""

from __future__ import annotations

import os
import pickle
import socket
import threading

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.contracts.errors import UserError
from pipeline.contracts.storage import (
    MULTIPART_THRESHOLD,
    LocalStorage,
    S3Storage,
    open_storage,
    read_uri,
    safe_segment,
    validate_key,
)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    return open_storage(request.getfixturevalue("s3_bucket"))


def test_put_get_exists_list(storage):
    assert not storage.exists("a/b.txt")
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("a/b.txt")
    storage.put_bytes("a/b.txt", b"one", content_type="text/plain")
    storage.put_bytes("a/c/d.bin", b"\x00two")
    storage.put_bytes("ab.txt", b"three")
    storage.put_bytes("a/b.txt", b"four")  # overwrite
    assert storage.get_bytes("a/b.txt") == b"four"
    assert storage.exists("a/c/d.bin")
    assert not storage.exists("a/c")  # a "folder" is not an object
    assert list(storage.list_keys()) == ["a/b.txt", "a/c/d.bin", "ab.txt"]
    assert list(storage.list_keys("a/")) == ["a/b.txt", "a/c/d.bin"]
    assert list(storage.list_keys("a")) == ["a/b.txt", "a/c/d.bin", "ab.txt"]  # string prefix
    assert list(storage.list_keys("a/c/d")) == ["a/c/d.bin"]
    assert list(storage.list_keys("zzz/")) == []
    assert storage.delete_prefix("a/") == 2
    assert list(storage.list_keys()) == ["ab.txt"]


def test_conditional_writes_compare_the_version_read(storage):
    first = storage.put_if("lease/l.json", b"one", match=None)
    assert first is not None
    assert storage.put_if("lease/l.json", b"two", match=None) is None  # one is there
    assert storage.get_tagged("lease/l.json") == (b"one", first)
    second = storage.put_if("lease/l.json", b"two", match=first)
    assert second is not None and second != first
    assert storage.put_if("lease/l.json", b"three", match=first) is None  # read before "two"
    assert storage.delete_if("lease/l.json", match=first) is False
    assert storage.get_bytes("lease/l.json") == b"two"
    assert list(storage.list_keys()) == ["lease/l.json"]  # nothing else to see
    assert storage.delete_if("lease/l.json", match=second) is True
    assert not storage.exists("lease/l.json")
    assert storage.put_if("lease/l.json", b"four", match=second) is None  # nothing to replace
    assert storage.delete_if("lease/l.json", match=second) is False
    assert storage.delete_if("nowhere/l.json", match=second) is False
    with pytest.raises(FileNotFoundError):
        storage.get_tagged("lease/l.json")


def test_of_writers_holding_one_version_exactly_one_replaces_it(storage):
    tag = storage.put_if("l.json", b"stale", match=None)
    barrier = threading.Barrier(6)
    won: list[bytes] = []

    def replace(i: int) -> None:
        barrier.wait(timeout=30)
        if storage.put_if("l.json", b"mine %d" % i, match=tag) is not None:
            won.append(b"mine %d" % i)

    threads = [threading.Thread(target=replace, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1
    assert storage.get_bytes("l.json") == won[0]


def test_unicode_and_space_keys(storage):
    key = "frames/ünï cödé/000001.png"
    storage.put_bytes(key, b"x")
    assert list(storage.list_keys("frames/")) == [key]
    assert storage.get_bytes(key) == b"x"


def test_create_if_absent(storage):
    assert storage.create_if_absent("_runs/commits/u000001.json", b"first") is True
    assert storage.create_if_absent("_runs/commits/u000001.json", b"second") is False
    assert storage.get_bytes("_runs/commits/u000001.json") == b"first"


def test_create_if_absent_races_have_one_winner(storage):
    results: list[bool] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        ok = storage.create_if_absent("marker.json", f"writer {i}".encode())
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [False] * 7 + [True]
    assert storage.get_bytes("marker.json").startswith(b"writer ")


def test_large_object_round_trip(storage):
    data = os.urandom(1024) * (MULTIPART_THRESHOLD // 1024 + 3)  # multipart on S3
    storage.put_bytes("big/blob.bin", data)
    assert storage.get_bytes("big/blob.bin") == data


def test_listing_paginates(storage):
    if isinstance(storage, S3Storage):
        storage.list_page_size = 7  # several pages through the real paginator
    for i in range(30):
        storage.put_bytes(f"many/{i:04d}", b"")
    assert list(storage.list_keys("many/")) == [f"many/{i:04d}" for i in range(30)]
    assert storage.delete_prefix("many/") == 30
    assert list(storage.list_keys("many/")) == []


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a//b",
        "./a",
        "a/./b",
        "a\\b",
        "a\x00b",
        "a\nb",
        "",
        "..",
    ],
)
def test_key_escapes_rejected(storage, bad):
    with pytest.raises(UserError, match="unsafe storage key"):
        storage.put_bytes(bad, b"x")
    with pytest.raises(UserError):
        storage.exists(bad)


def test_local_never_writes_outside_root(tmp_path):
    root = tmp_path / "root"
    storage = LocalStorage(root)
    for bad in ("../escape", "a/../../escape"):
        with pytest.raises(UserError):
            storage.put_bytes(bad, b"x")
    assert not (tmp_path / "escape").exists()


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put_bytes("x/y.bin", b"1" * 10_000)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y.bin"]


def test_local_failed_write_keeps_old_content(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    storage.put_bytes("x.bin", b"old")

    def broken_replace(src, dst, **_dir_fds):
        raise OSError("disk on fire")

    monkeypatch.setattr("pipeline.contracts.storage.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        storage.put_bytes("x.bin", b"new")
    assert storage.get_bytes("x.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # temp file removed


def test_pickle_round_trip(storage):
    storage.put_bytes("p.txt", b"pickled")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.uri == storage.uri
    assert clone.get_bytes("p.txt") == b"pickled"


def test_child_storage(storage):
    child = storage.child("sub/dir")
    child.put_bytes("k.txt", b"c")
    assert storage.get_bytes("sub/dir/k.txt") == b"c"
    assert child.key_uri("k.txt") == storage.key_uri("sub/dir/k.txt")
    with pytest.raises(UserError):
        storage.child("../up")


def test_arrow_fs_reads_what_storage_wrote(storage):
    table = pa.table({"x": [1, 2, 3]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.put_bytes("t/run_id=a/part-0.parquet", sink.getvalue().to_pybytes())
    fs, base = storage.arrow_fs()
    dataset = ds.dataset(f"{base}/t", filesystem=fs, format="parquet", partitioning="hive")
    assert sorted(dataset.to_table()["x"].to_pylist()) == [1, 2, 3]


def test_read_uri(storage):
    storage.put_bytes("seed/a.png", b"png")
    assert read_uri(storage.key_uri("seed/a.png")) == b"png"
    with pytest.raises(FileNotFoundError):
        read_uri(storage.key_uri("seed/missing.png"))


def test_check_writable_ok(storage):
    storage.check_writable()
    assert list(storage.list_keys()) == []  # the probe is gone


def test_unwritable_local_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="not writable") as info:
        LocalStorage(blocker / "out").check_writable()
    assert str(blocker) in str(info.value)


def test_missing_bucket_names_bucket_and_endpoint(s3_server):
    storage = open_storage("s3://no-such-bucket-here/out", endpoint_url=s3_server)
    with pytest.raises(UserError) as info:
        storage.check_writable()
    message = str(info.value)
    assert "no-such-bucket-here" in message and s3_server in message
    with pytest.raises(UserError, match="no-such-bucket-here"):
        list(storage.list_keys())


def test_unreachable_endpoint_fails_fast(s3_server):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    storage = open_storage("s3://some-bucket/out", endpoint_url=endpoint)
    with pytest.raises(UserError, match="cannot reach") as info:
        storage.check_writable()
    assert "some-bucket" in str(info.value) and endpoint in str(info.value)


def test_credentials_never_shown(s3_server):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    endpoint = s3_server.replace("http://", "http://user:hunter2@")
    storage = open_storage("s3://no-such-bucket-here/out", endpoint_url=endpoint)
    texts = [repr(storage), storage.uri, storage.key_uri("k"), str(pickle.dumps(storage))]
    assert storage.endpoint_url == s3_server
    for attempt in (storage.check_writable, lambda: storage.get_bytes("k")):
        with pytest.raises((UserError, FileNotFoundError)) as info:
            attempt()
        texts.append(str(info.value))
    for text in texts:
        for forbidden in (secret, key_id, "hunter2"):
            assert forbidden not in text


def test_endpoint_from_environment(s3_bucket):
    storage = open_storage(s3_bucket)  # AWS_ENDPOINT_URL_S3 is set by the fixture
    assert isinstance(storage, S3Storage)
    assert storage.endpoint_url == os.environ["AWS_ENDPOINT_URL_S3"]
    storage.put_bytes("k", b"v")
    assert storage.get_bytes("k") == b"v"


def test_bad_uris():
    with pytest.raises(UserError, match="bucket name"):
        open_storage("s3://Bad_Bucket/x")
    with pytest.raises(UserError, match="unsupported"):
        open_storage("gs://bucket/x")
    with pytest.raises(UserError):
        open_storage("s3://bucket/../x")


def test_validate_key_prefix_mode():
    assert validate_key("", prefix=True) == ""
    assert validate_key("a/b/", prefix=True) == "a/b/"
    with pytest.raises(UserError):
        validate_key("a/b/")


# --- safe_segment -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip_001", "frame-3.png", "ünïcödé", "日本語", "a.b_c-d"])
def test_safe_names_unchanged(name):
    assert safe_segment(name) == name


@pytest.mark.parametrize(
    "name", ["..", ".", "../../etc/passwd", "a/b", "a b", "/abs", "x\x00y", "-rf", ".hidden", ""]
)
def test_unsafe_names_become_valid_segments(name):
    out = safe_segment(name)
    validate_key(out)
    assert "/" not in out and out not in (".", "..") and not out.startswith((".", "-"))


def test_collisions_are_disambiguated():
    assert safe_segment("a/b") != safe_segment("a_b")
    assert safe_segment("a b") != safe_segment("a_b")
    assert safe_segment("x" * 300) != safe_segment("x" * 301)
    assert len(safe_segment("x" * 300)) <= 96


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=150))
def test_safe_segment_properties(name):
    out = safe_segment(name)
    validate_key(out)  # a valid single key segment
    assert "/" not in out and ".." not in out
    assert 1 <= len(out) <= 96
    assert safe_segment(out) == out  # idempotent
    assert safe_segment(name) == out  # deterministic


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_safe_segment_injective(a, b):
    assert a == b or safe_segment(a) != safe_segment(b)


def test_storage_travels_to_ray_workers(ray_local, s3_bucket, tmp_path):
    """Ray pickles storages to workers, which rebuild their S3 clients and see the endpoint."""
    import ray

    @ray.remote
    def write(storage, key: str) -> str:
        storage.put_bytes(key, b"from a worker")
        return storage.uri

    for storage in (open_storage(s3_bucket), open_storage(str(tmp_path / "out"))):
        assert ray.get(write.remote(storage, "w/k.txt"), timeout=120) == storage.uri
        assert storage.get_bytes("w/k.txt") == b"from a worker"
