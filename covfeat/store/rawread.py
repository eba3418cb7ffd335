"""A checked shard's feature rows read straight from its mapped file, without HDF5.

Reading rows through h5py costs more than the work done on them: a file open per shard per
read, the chunk B-tree, Fletcher-32 recomputed on every chunk, a copy into a buffer.  A
shard's ``features`` are written one row per chunk, uncompressed, with Fletcher-32 alone:
each chunk is the row's bytes followed by 4 checksum bytes.  So once a shard's layout is
known to be that one, the rows are plain bytes at known offsets of the file, and the
dropout kernel can read them from the mapped pages directly (no copy).

Integrity.  A shard is mapped the first time this process reads it: its file is opened and
mapped once (the mapping is kept, the file is never reopened by path), and the SHA-256 of
its rows, read at the recorded chunk offsets in that mapping, is compared with the index's
record -- the same check, on the very bytes later reads use.  On a mismatch the rows are
read again through h5py so that Fletcher-32 names the damage as before.  What is covered
after the check: every later read first compares the file's size, mtime and ctime with
those seen at the check; a change re-hashes the mapped rows against the record (damage
stops the run, a mere rename or chmod does not), and a change of size is damage.  What is
not: a change made in place while an epoch is reading, or one that also restores both
times (ctime cannot be set by a user, only by the clock); and a file truncated under a
running read ends the process with SIGBUS.  Shards are immutable once written, so any of
these is tampering or a failing disk, not covfeat's own doing.

A layout other than the expected one (compression, other filters, a chunk that is not one
row, a chunk not where it should be, a byte order other than this machine's) is refused
with its reason and read through h5py as before: never guessed at.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
from dataclasses import dataclass

import h5py
import numpy as np
from numba import njit, prange, typed


@dataclass
class MappedShard:
    """One checked shard file, mapped read-only for the life of the process."""

    fd: int
    mm: mmap.mmap
    words: np.ndarray  # the whole file as elements of the features' dtype (read-only, C)
    offsets: np.ndarray  # per local row: element offset of its first value in ``words``
    row_len: int  # elements per row
    stamp: tuple  # (size, mtime_ns, ctime_ns) when checked
    expected: str  # the features' SHA-256 the index records

    def rows_sha256(self) -> str:
        h = hashlib.sha256()
        mv = memoryview(self.mm)
        b = self.words.itemsize
        for o in self.offsets:
            h.update(mv[int(o) * b:(int(o) + self.row_len) * b])
        return h.hexdigest()

    def changed(self) -> str | None:
        """None when the mapped file is as checked (re-hashing it if its times moved), else why not."""
        st = os.fstat(self.fd)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if stamp == self.stamp:
            return None
        if st.st_size != self.stamp[0]:
            return "its size changed after this process checked it"
        return "changed" if self.rows_sha256() != self.expected else self._restamp(stamp)

    def _restamp(self, stamp):
        self.stamp = stamp
        return None

    def rows(self, local: np.ndarray) -> np.ndarray:
        """Copies of the given local rows, (len(local), row_len) in the features' dtype."""
        out = np.empty((len(local), self.row_len), self.words.dtype)
        gather_rows(self.words, self.offsets[local], out)
        return out


def row_layout(ds: h5py.Dataset, file_size: int) -> np.ndarray | str:
    """Element offsets of each row of ``ds`` in its file, or why its layout is not one mapped."""
    n, shape, dt = ds.shape[0], ds.shape[1:], ds.dtype
    if dt not in (np.dtype("<f2"), np.dtype("<f4")) or sys.byteorder != "little":
        return f"dtype {dt} on a {sys.byteorder}-endian machine"
    if ds.chunks != (1, *shape):
        return f"chunks {ds.chunks}, not one row"
    dcpl = ds.id.get_create_plist()
    filters = [dcpl.get_filter(k)[0] for k in range(dcpl.get_nfilters())]
    if filters not in ([], [h5py.h5z.FILTER_FLETCHER32]):
        return f"filters {filters}"
    row_bytes = int(np.prod(shape)) * dt.itemsize
    size = row_bytes + 4 * bool(filters)
    if ds.id.get_num_chunks() != n:
        return f"{ds.id.get_num_chunks()} chunks for {n} rows"
    offsets = np.full(n, -1, np.int64)
    for k in range(n):
        info = ds.id.get_chunk_info(k)
        r, at = info.chunk_offset[0], info.byte_offset
        if info.filter_mask or info.size != size or at % dt.itemsize or at + size > file_size or offsets[r] >= 0:
            return f"chunk {k}: {info}"
        offsets[r] = at // dt.itemsize
    return offsets


def map_shard(path, offsets: np.ndarray, dtype, row_len: int, expected: str) -> MappedShard:
    """Open and map ``path`` once; the caller compares ``rows_sha256()`` with the record."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        mm = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    words = np.frombuffer(mm, dtype=np.uint16 if dtype == np.float16 else np.float32,
                          count=st.st_size // np.dtype(dtype).itemsize)
    return MappedShard(fd, mm, words, offsets, row_len, (st.st_size, st.st_mtime_ns, st.st_ctime_ns), expected)


class MappedFiles:
    """The process's mapped shards as one numba typed List, and each shard's place in it."""

    def __init__(self):
        self.files = None
        self.slot: dict[int, int] = {}
        self.sample_slot = self.sample_offset = None  # per sample of the cache: its shard's slot, its row's offset

    def add(self, i: int, m: MappedShard, start: int, n_samples: int) -> None:
        if self.files is None:
            self.files = typed.List()
            self.sample_slot = np.full(n_samples, -1, np.int64)
            self.sample_offset = np.full(n_samples, -1, np.int64)
        self.slot[i] = len(self.files)
        self.files.append(m.words)
        self.sample_slot[start:start + len(m.offsets)] = self.slot[i]
        self.sample_offset[start:start + len(m.offsets)] = m.offsets


@njit(parallel=True, cache=True, nogil=True)
def gather_rows(words, offsets, out):
    n, m = out.shape
    for i in prange(n):
        o = offsets[i]
        for j in range(m):
            out[i, j] = words[o + j]
