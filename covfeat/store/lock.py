"""The per-cache lock file: exclusive for whatever must be alone, shared for shard writers."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from covfeat.core.errors import CacheLocked


class CacheLock:
    """A non-blocking lock on ``<cache>.lock``; the OS drops it if we die.

    Exclusive for whatever must be alone (the local driver, writing the index, --rebuild,
    clean); shared (``shared=True``) for processes that only add shards (--shard slices, a
    Ray driver), so several may work at once while clean and --rebuild wait for them."""

    def __init__(self, target: Path, shared: bool = False):
        self.path = target.with_name(target.name + ".lock")
        self.shared = shared
        self._fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "unknown"
            self._fh.close()
            raise CacheLocked(
                f"Another covfeat process (pid {holder}) is writing {self.path.with_suffix('').name}; "
                "wait for it to finish, or stop it and run again to resume."
            ) from None
        if not self.shared:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(str(os.getpid()))
            self._fh.flush()
        return self

    def __exit__(self, *exc):
        # The lock file stays: deleting it would let a process that opened the old file and a
        # process that creates a new one both hold "the" lock.
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
