"""One home for file safety: the atomic file, the atomic folder, durable renames, process
liveness, the sweep of leftovers whose writer is gone, covfeat's user-cache folders, and a
file's SHA-256.

Every writer of covfeat's files (shards, the cache index, run folders, the head template,
the backbone graph cache) goes through here, so a fix to durability or to the clean-up of
killed runs lands everywhere.  The model is Hugging Face datasets' ``incomplete_dir``:
work happens under a temporary name beside the final one, which appears in one rename only
when the work is whole.  Here the temporary name also carries the writer's host and pid (and
a random suffix, so two writers in one process never share it), and everything is fsynced
before the rename and the folder after it, so that neither a kill -9 nor a power loss
leaves a half-written file or folder under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

# This machine's name as temporary names and owner files record it (dots separate the fields
# of a temporary name, so they become underscores).
HOST = socket.gethostname().replace(".", "_")


OWNER = ".covfeat-owner"  # "host pid" of the process writing a temporary folder


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)(?:\.[0-9a-f]{8})?\.tmp$")


def user_cache(env: str, name: str) -> Path:
    """A folder of covfeat's user cache: ``$env``, else ``$XDG_CACHE_HOME/covfeat/name``,
    else ``~/.cache/covfeat/name``."""
    if os.environ.get(env):
        return Path(os.environ[env])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "covfeat" / name


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The digest of a file's bytes, read in blocks (weights files are hundreds of MB): the one
    file hash of covfeat (images, weights files, source files in a fingerprint)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes."""
    return file_digest(path, "sha256")


def alive(pid: int) -> bool:
    """Whether a process of this host has this pid (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(folder: str | Path) -> None:
    """Make a rename durable: fsync the folder that holds the new name.  Some file systems
    cannot open or fsync a folder; there the rename is as durable as they make it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """Every file, then every folder, from the leaves up."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def temp_path(final: Path) -> Path:
    """A temporary name beside ``final``: ``.NAME.HOST.PID.RANDOM.tmp``, so that the sweep can
    tell whose it is and no two writers (processes or threads) share one."""
    return final.parent / f".{final.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def writer(path: Path) -> tuple[str, int] | None:
    """The host and pid that own a temporary file or folder: from its name, else (folders of
    earlier covfeat versions) from its owner file; None when it is not covfeat's."""
    m = _TEMP.match(path.name)
    if m:
        return m["host"], int(m["pid"])
    try:
        host, pid = (path / OWNER).read_text().split()
        return host.replace(".", "_"), int(pid)
    except (OSError, ValueError):
        return None


def remove_stale(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` whose writer was on this host and
    is gone; return them.  Those of live writers, of other hosts (their pids mean nothing
    here) and anything that is not covfeat's are left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in sorted(folder.glob(".*.tmp")):
        w = writer(p)
        if w is None or w[0] != HOST or alive(w[1]):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def create_new(path: Path) -> None:
    """Create an empty file that did not exist: O_EXCL and O_NOFOLLOW, so nothing planted at the
    name (a symlink to a file the writer can write) is ever opened in its place."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """``with atomic_file(path) as tmp:`` write ``tmp``; when the body returns, ``tmp`` is
    fsynced and renamed to ``path`` (replacing it) and the folder fsynced; on an exception it
    is removed and ``path`` is untouched.  ``tmp`` exists (empty) when the body starts: it is
    created exclusively, so a symlink planted at its name is never followed."""
    path = Path(path)
    tmp = temp_path(path)
    create_new(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class AtomicDir:
    """The one atomic folder: ``with AtomicDir(parent, name) as d:`` write into ``d.path`` (a
    temporary folder beside the final one, holding an owner file while it is written); when
    the body returns, every file and folder in it is fsynced, it is renamed, the parent is
    fsynced, and ``d.final`` says where it went.  On an exception it is removed and nothing
    is left behind.  Entering also sweeps the parent's leftovers of dead writers.

    ``taken`` says what happens when the final name exists: ``"next"`` (run folders) takes
    ``name-2``, ``name-3``...; ``"keep"`` (user-cache entries, a pure function of their key)
    keeps the entry another process made first and drops this one.
    """

    def __init__(self, parent: str | Path, name: str, *, taken: str = "next"):
        if taken not in ("next", "keep"):
            raise ValueError(f"taken: expected 'next' or 'keep', got {taken!r}")
        self.parent = Path(parent)
        self.name = name
        self.taken = taken
        self.path = temp_path(self.parent / name)
        self.final: Path | None = None

    def __enter__(self) -> "AtomicDir":
        self.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.parent)
        self.path.mkdir()
        (self.path / OWNER).write_text(f"{HOST} {os.getpid()}")
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                (self.path / OWNER).unlink()
                _fsync_tree(self.path)
                self.final = self._rename()
                fsync_dir(self.parent)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)  # gone already after the rename
        return False

    def _rename(self) -> Path:
        final = self.parent / self.name
        if self.taken == "keep":
            if final.is_dir():
                return final
            try:
                os.rename(self.path, final)
            except OSError:
                if not final.is_dir():  # not another process's entry: a real failure
                    raise
            return final
        k = 1
        while True:
            if not final.exists():
                try:
                    os.rename(self.path, final)
                    return final
                except OSError:
                    if not final.exists():  # not taken meanwhile by another writer: a real failure
                        raise
            k += 1
            final = self.parent / f"{self.name}-{k}"


from covfeat.core.errors import CovfeatError  # noqa: E402  (with the one check that raises it, below)


class UnsafeFolder(CovfeatError):
    """A cache folder that someone else can write.  Not an ``OSError``: the handlers that turn
    an unwritable cache into a note must not turn this into one."""


def private_dir(path: str | Path, what: str, env: str) -> Path:
    """``path`` as a folder only its owner can change, created (mode 0o700) when missing;
    ``UnsafeFolder`` otherwise, as ssh refuses a group-writable key.

    covfeat runs what its user caches hold (a traced TensorFlow graph, a Keras file), and their
    checksums sit beside them, so whoever can write a cache folder, or rename one of its
    ancestors, can make a later run do what they wrote.  Checked: the folder and every ancestor
    of it, as written and as resolved through symlinks, up to the user's home (trusted as ssh
    trusts it) or the root.  Each must belong to the user or to root and be writable by no one
    else; an ancestor writable by all but sticky (``/tmp``) is safe as Python's ``tempfile``
    takes it (no one else may rename or delete what is in it), the cache folder itself is not.
    Walked to the root, not to the first root-owned ancestor: a root-owned folder inside a
    folder others can write can be renamed away and replaced.  An ``OSError`` means the folder
    cannot be made (the caller's note)."""
    import pwd
    import stat

    path = Path(os.path.abspath(path))
    for p in [*reversed(path.parents), path]:
        if not p.is_dir():
            try:
                p.mkdir(mode=0o700)
            except FileExistsError:
                if not p.is_dir():
                    raise
    home = {os.path.abspath(Path.home()), os.path.realpath(Path.home())}
    uid = os.getuid()
    real = Path(os.path.realpath(path))
    for leaf in dict.fromkeys([real, path]):  # where it leads first, so that a message names that folder
        for p in [leaf, *leaf.parents]:
            st = os.stat(p)
            if st.st_uid not in (uid, 0):
                try:
                    owner = f"{pwd.getpwuid(st.st_uid).pw_name} (uid {st.st_uid})"
                except KeyError:
                    owner = f"uid {st.st_uid}"
                where = "is" if p == leaf else f"is inside {p}, which is"
                raise UnsafeFolder(f"the {what} {leaf} {where} owned by {owner}, not by you: its owner can make "
                                   f"covfeat run what they write there; set {env} to a folder of your own.")
            writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if writable and not (p != leaf and st.st_mode & stat.S_ISVTX):
                who = " and ".join(w for w, bit in (("its group", stat.S_IWGRP), ("all users", stat.S_IWOTH))
                                   if st.st_mode & bit)
                where = "is" if p == leaf else f"is inside {p}, which is"
                raise UnsafeFolder(f"the {what} {leaf} {where} writable by {who} (mode {oct(stat.S_IMODE(st.st_mode))}): "
                                   f"they can make covfeat run what they write there; chmod go-w {p}, or set {env} "
                                   "to a private folder.")
            if str(p) in home:
                break
    return path
