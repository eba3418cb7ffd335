"""One home for file safety: covfeat's user-cache folders, atomic entries, and process liveness."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def user_cache(env: str, name: str) -> Path:
    """A folder of covfeat's user cache: ``$env``, else ``$XDG_CACHE_HOME/covfeat/name``,
    else ``~/.cache/covfeat/name``."""
    if os.environ.get(env):
        return Path(os.environ[env])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "covfeat" / name


@contextlib.contextmanager
def cache_entry(folder: Path):
    """Write a user-cache entry whole or not at all: the body fills a temporary folder beside
    ``folder``, which then takes its name in one rename.  When another process made the same
    entry first, theirs is kept (an entry is a pure function of its key)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_HOST = __import__("socket").gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder that holds the new name."""
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
