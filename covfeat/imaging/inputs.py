"""Opening an input file: regular files only, and never more bytes than the limit.

A ``.png`` that is a FIFO blocks whoever opens it, ``/dev/zero`` streams forever, and a
``/proc`` file is "regular" with a size of 0 yet yields bytes.  So the kind is taken from
``stat`` before opening (a device is never opened: opening some has effects of its own), the
file is opened without blocking and checked again on the open descriptor (it may have been
swapped in between), and reading stops one byte past the size limit, whatever the size said.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"))
_CHUNK = 1 << 20


class NotOpened(Exception):
    """A file that is not read, with the reason (``str(exc)``): not a regular file, or over the size limit."""


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def too_large(size: int, max_file_mb: float | None) -> str | None:
    """The reason a file of ``size`` bytes is not read, or None."""
    if max_file_mb and size > max_file_mb * 2**20:
        return f"file of {size / 2**20:.0f} MB exceeds --max-file-mb {max_file_mb:g}"
    return None


def check_regular(path: str | Path, max_file_mb: float | None = None) -> int:
    """The size of ``path`` from ``stat``, before any open.

    Raises
    ------
    NotOpened
        Not a regular file (FIFO, device, socket, folder), or larger than ``max_file_mb``.
    OSError
        It cannot be stat'ed (gone, no permission).
    """
    st = os.stat(path)
    kind = _kind(st.st_mode)
    if kind is not None:
        raise NotOpened(f"not a regular file ({kind}); not opened")
    reason = too_large(st.st_size, max_file_mb)
    if reason:
        raise NotOpened(reason)
    return st.st_size


def _chunks(path: str | Path, max_file_mb: float | None):
    check_regular(path, max_file_mb)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        kind = _kind(os.fstat(fd).st_mode)  # swapped for a FIFO between stat and open?
        if kind is not None:
            raise NotOpened(f"not a regular file ({kind}); not opened")
        cap = int(max_file_mb * 2**20) if max_file_mb else None
        n = 0
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return
            n += len(chunk)
            if cap is not None and n > cap:  # a file that grows, or a /proc file whose size says 0
                raise NotOpened(f"file of more than {max_file_mb:g} MB read; exceeds --max-file-mb {max_file_mb:g}")
            yield chunk


def read_regular(path: str | Path, max_file_mb: float | None = None) -> bytes:
    """The bytes of a regular file, read once (see the module's docstring).

    Raises NotOpened or OSError."""
    return b"".join(_chunks(path, max_file_mb))


def sha256_regular(path: str | Path, max_file_mb: float | None = None) -> str:
    """The SHA-256 of a regular file's bytes, streamed (see the module's docstring).

    Raises NotOpened or OSError."""
    h = hashlib.sha256()
    for chunk in _chunks(path, max_file_mb):
        h.update(chunk)
    return h.hexdigest()
