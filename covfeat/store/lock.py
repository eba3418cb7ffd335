"""Locks on files of a cache folder: the per-cache lock (exclusive for whatever must be alone,
shared for shard writers) and the per-shard claims, on one primitive, :class:`FileLock`.

A lock file is opened with O_NOFOLLOW and must be a regular file, so a symlink planted at its
name in a shared cache folder never makes covfeat open (or write) the file it points to.  A
lock file may be removed only by the process that holds it exclusively; every taker checks,
once it holds the lock, that the file it locked is still the one at that name (else it
locked a file already removed, and tries again), so removing one never lets two processes
hold "the" lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from covfeat.core.errors import CacheError, CacheLocked
from covfeat.core.fsutil import HOST

NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class Busy(Exception):
    """The lock is held by another process; ``holder`` is its "host pid", or "" when unknown."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class FileLock:
    """A flock on ``path`` (created if need be): ``shared`` or exclusive, non-blocking unless
    ``wait``.  An exclusive holder writes its "host pid" into the file (so a busy message can
    name it) and empties it before it lets go; a shared holder empties a stale one (no
    exclusive holder can exist beside it) and writes nothing."""

    def __init__(self, path: Path, shared: bool = False, wait: bool = False):
        self.path = Path(path)
        self.shared = shared
        self.wait = wait
        self.fd: int | None = None

    def acquire(self) -> "FileLock":
        while True:
            fd = _open_lock(self.path)
            try:
                mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
                fcntl.flock(fd, mode if self.wait else mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise Busy(holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in NO_LOCKING:
                    raise CacheError(f"the file system of {self.path.parent} does not support file locks "
                                     f"({os.strerror(exc.errno)}), which covfeat needs to keep two processes from "
                                     "writing one cache; use a --cache-dir on a local disk (or a share mounted with "
                                     "locking)") from None
                raise
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its holder removed meanwhile: take the one at the name now
        self.fd = fd
        os.ftruncate(fd, 0)
        if not self.shared:
            os.pwrite(fd, f"{HOST} {os.getpid()}".encode(), 0)
        return self

    def release(self, remove: bool = False) -> None:
        """Let go; ``remove`` (exclusive holders only) removes the lock file first."""
        if self.fd is None:
            return
        try:
            if not self.shared:
                os.ftruncate(self.fd, 0)
                if remove:
                    self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _open_lock(path: Path) -> int:
    """Open (or create) a lock file without following a symlink; refuse anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CacheError(f"the lock file {path} is a symlink; covfeat never writes through one there (it could "
                             "point at any file you can write): remove it and run again") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheError(f"the lock file {path} is not a regular file; remove it and run again")
    return fd


def describe_holder(holder: str) -> str:
    host, _, pid = holder.partition(" ")
    if host and pid.isdigit():
        return f"pid {pid} on {host}"
    return "a run adding shards; its shard claims name it"


class CacheLock:
    """A non-blocking lock on ``<cache>.lock``; the OS drops it if we die.

    Exclusive for whatever must be alone (writing the index, --rebuild, clean); shared
    (``shared=True``) for processes that add shards (the local driver, --shard slices, a Ray
    driver: per-shard claims, :mod:`covfeat.store.claims`, keep them from repeating each
    other's work), so several may work at once while clean and --rebuild wait for them.
    ``wait`` blocks until the lock is free instead of failing."""

    def __init__(self, target: Path, shared: bool = False, wait: bool = False):
        self.path = target.with_name(target.name + ".lock")
        self.lock = FileLock(self.path, shared=shared, wait=wait)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Busy as exc:
            raise CacheLocked(
                f"Another covfeat process ({describe_holder(exc.holder)}) is writing "
                f"{self.path.name[:-len('.lock')]}; wait for it to finish, or stop it and run again to resume."
            ) from None
        return self

    def release(self, remove: bool = False) -> None:
        self.lock.release(remove)

    def __exit__(self, *exc):
        # The lock file stays: only clean removes one, holding it, for a cache it removed.
        self.lock.release()
