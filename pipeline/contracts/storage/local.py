"""A local folder as storage; writes go to a temporary file renamed into place.

Nothing is written or deleted outside the root, symlinks included: every write and delete
walks from the root one folder at a time with `O_NOFOLLOW` (file descriptors, not path
strings, so a link swapped in between two steps is not followed either), and a symbolic
link met on the way is refused with a `StorageFatalError` naming it, and so is a link, a
folder or a pipe standing where a conditional write goes. The root itself may be a link:
the user chose it. A full, read-only or unwritable folder is a `StorageFatalError`
naming the root, never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.contracts.errors import UserError
from pipeline.contracts.storage.base import (
    PROBE_PREFIX,
    ObjectHead,
    Storage,
    StorageFatalError,
    TransientStorageError,
    too_large,
    validate_key,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: errno -> what a write that failed with it means for the user.
_FATAL_ERRNOS = {
    errno.ENOSPC: "is full",
    errno.EDQUOT: "is over its disk quota",
    errno.EROFS: "is on a read-only file system",
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted)",
}
#: errno from link(2) on a file system without hard links (vfat, exFAT, some FUSE mounts):
#: `create_if_absent` then creates the name exclusively instead.
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                  errno.ENOSYS}
#: Seconds a conditional write waits for another one of the same key to finish (each holds
#: the lock for one read and one rename).
LOCK_WAIT_S = 10.0


def _tag(data: bytes) -> str:
    """A local object's version tag: a digest of its bytes (as S3's ETag of a simple put)."""
    return hashlib.sha256(data).hexdigest()


def _hidden(name: str) -> bool:
    """An in-flight atomic write (`.x.tmp`) or a conditional write's lock (`.x.lock`)."""
    return name.startswith(".") and name.endswith((".tmp", ".lock"))


def read_file(path: Path, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a local file, never more than `max_bytes` of them read (UserError)."""
    with open(path, "rb") as fh:
        if max_bytes is None:
            return fh.read()
        data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise too_large(str(path), os.fstat(fh.fileno()).st_size, max_bytes)
        return data


class LocalStorage(Storage):
    """A local folder; writes go to a temporary file that is renamed into place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    # ------------------------------------------------------------------ no-follow walking

    def _refuse_link(self, rel: str, action: str) -> StorageFatalError:
        return StorageFatalError(
            f"refusing to {action} through the symbolic link {self.root / rel} inside the "
            f"output root {self.uri}: nothing is written or deleted outside the root; "
            "remove the link (or choose another output root)")

    @contextmanager
    def _parent(self, key: str, *, create: bool, action: str) -> Iterator[tuple[int, str]]:
        """(fd of the folder holding `key`, its file name), reached from the root without
        following a symbolic link; folders are created on the way when `create`."""
        parts = validate_key(key).split("/")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for depth, part in enumerate(parts[:-1]):
                if create:
                    with suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                try:
                    child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                            os.lstat(part, dir_fd=fd).st_mode):
                        raise self._refuse_link("/".join(parts[:depth + 1]), action) from None
                    raise
                os.close(fd)
                fd = child
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _check_file(self, dir_fd: int, name: str, key: str) -> None:
        """StorageFatalError naming `key` when what stands there is not a regular file (a
        folder, a pipe, a link): no conditional write can succeed there, and reads take it
        for no object at all. FileNotFoundError when nothing is there."""
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
        if stat.S_ISLNK(mode):
            raise self._refuse_link(key, "write")
        if not stat.S_ISREG(mode):
            raise StorageFatalError(
                f"{self.root / key} is not a file (a folder, pipe or device) inside the output "
                f"root {self.uri}; nothing this tool writes: remove it, then rerun")

    def _fatal(self, exc: OSError, key: str) -> TransientStorageError | StorageFatalError:
        what = _FATAL_ERRNOS.get(exc.errno or 0)
        if what is None:  # transient or unexpected: the caller may retry
            return TransientStorageError(
                f"writing {key} under {self.uri} failed ({exc.strerror or exc})")
        return StorageFatalError(
            f"output root {self.uri} {what} ({exc.strerror or exc}) while writing {key}; fix "
            "that (or choose another output.root), then rerun the same command to resume")

    @staticmethod
    def _write_new(dir_fd: int, name: str, data: bytes) -> None:
        fd = os.open(name, _NEW_FILE_FLAGS, 0o644, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=dir_fd)
            raise
        os.close(fd)

    @classmethod
    def _replace_at(cls, dir_fd: int, name: str, data: bytes) -> None:
        tmp = f".{name}.{uuid.uuid4().hex[:12]}.tmp"
        cls._write_new(dir_fd, tmp, data)
        try:
            # rename replaces a link at `name` itself; it never writes through it.
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(tmp, dir_fd=dir_fd)
            raise

    # ------------------------------------------------------------------ the interface

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        try:
            with self._parent(key, create=True, action="write") as (dir_fd, name):
                self._replace_at(dir_fd, name, data)
        except OSError as exc:
            raise self._fatal(exc, key) from None

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object {key!r} under {self.uri}")
        return read_file(path, max_bytes=max_bytes)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def head(self, key: str) -> ObjectHead:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object {key!r} under {self.uri}")
        return ObjectHead(size=path.stat().st_size)  # a folder keeps no checksums

    def _inside_without_links(self, folder: Path) -> bool:
        """Whether every folder from the root down to `folder` is a real folder."""
        current = self.root
        for part in folder.relative_to(self.root).parts:
            current = current / part
            if current.is_symlink() or not current.is_dir():
                return False
        return True

    def list_keys(self, prefix: str = "", *, start_after: str = "") -> Iterator[str]:
        validate_key(prefix, prefix=True)
        # Walk only the deepest folder the prefix names; the rest is a string prefix, as on S3.
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir() or not self._inside_without_links(start):
            return  # a linked folder is not part of the root: its contents are not listed
        keys = []
        for dirpath, _dirnames, filenames in os.walk(start):  # never descends into links
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _hidden(name):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix) and key > start_after:
                    keys.append(key)
        # Whole-key order, as S3 lists (a folder walk would put 'ab' before 'a/b').
        yield from sorted(keys)

    def create_if_absent(self, key: str, data: bytes) -> bool:
        try:
            with self._parent(key, create=True, action="write") as (dir_fd, name):
                return self._create_at(dir_fd, name, data, key=key)
        except OSError as exc:
            raise self._fatal(exc, key) from None

    def _create_at(self, dir_fd: int, name: str, data: bytes, *, key: str) -> bool:
        tmp = f".{name}.{uuid.uuid4().hex[:12]}.tmp"
        self._write_new(dir_fd, tmp, data)
        try:
            # A hard link publishes the complete file atomically and fails if the name exists.
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            return True
        except FileExistsError:
            self._check_file(dir_fd, name, key)
            return False
        except OSError as exc:
            if exc.errno in _FATAL_ERRNOS and exc.errno not in _NO_HARD_LINKS:
                raise  # full, over quota, read-only, no access: the fallback fails the same
            # File systems without hard links: exclusive create (not atomic for readers). A
            # real permission problem fails there again, and is reported as fatal then.
            try:
                self._write_new(dir_fd, name, data)
            except FileExistsError:
                self._check_file(dir_fd, name, key)
                return False
            return True
        finally:
            os.unlink(tmp, dir_fd=dir_fd)

    def get_tagged(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        data = self.get_bytes(key, max_bytes=max_bytes)
        return data, _tag(data)

    @contextmanager
    def _locked(self, key: str, *, create: bool) -> Iterator[tuple[int, str]]:
        """The folder and name of `key` (as `_parent`), with the key's lock file held: the
        conditional writes of one key run one at a time, across processes and PID
        namespaces. The lock file is never deleted (one deleted while another process
        waits on it would let two in), and a crashed holder's lock is released by the
        kernel."""
        with self._parent(key, create=create, action="write") as (dir_fd, name):
            fd = os.open(f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644, dir_fd=dir_fd)
            try:
                deadline = time.monotonic() + LOCK_WAIT_S
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TransientStorageError(
                                f"{self.root / key} stayed locked by another writer for "
                                f"{LOCK_WAIT_S:g}s") from None
                        time.sleep(0.01)
                yield dir_fd, name
            finally:
                os.close(fd)  # releases the lock

    def _tag_at(self, dir_fd: int, name: str, key: str) -> str | None:
        try:
            self._check_file(dir_fd, name, key)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as fh:
            return _tag(fh.read())

    def put_if(self, key: str, data: bytes, *, match: str | None) -> str | None:
        if match is None:
            return _tag(data) if self.create_if_absent(key, data) else None
        try:
            with self._locked(key, create=True) as (dir_fd, name):
                if self._tag_at(dir_fd, name, key) != match:
                    return None
                self._replace_at(dir_fd, name, data)
                return _tag(data)
        except TransientStorageError:
            raise
        except OSError as exc:
            raise self._fatal(exc, key) from None

    def delete_if(self, key: str, *, match: str) -> bool:
        try:
            with self._locked(key, create=False) as (dir_fd, name):
                if self._tag_at(dir_fd, name, key) != match:
                    return False
                os.unlink(name, dir_fd=dir_fd)
                return True
        except FileNotFoundError:
            return False  # its folder is gone
        except TransientStorageError:
            raise
        except OSError as exc:
            raise self._fatal(exc, key) from None

    def _delete(self, key: str) -> None:
        try:
            with self._parent(key, create=False, action="delete") as (dir_fd, name):
                os.unlink(name, dir_fd=dir_fd)  # a link is removed itself, never followed
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._fatal(exc, key) from None

    def check_writable(self) -> None:
        probe = self.root / f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"output folder {self.uri} is not writable ({exc.strerror or exc}); "
                "choose another output root or fix its permissions"
            ) from None

    def arrow_fs(self) -> tuple[Any, str]:
        return pafs.LocalFileSystem(), self.root.as_posix()

    def key_uri(self, key: str) -> str:
        return str(self._path(key))

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._path(prefix))
