"""A checked shard's feature rows read straight from its mapped file, without HDF5.

Reading rows through h5py costs more than the work done on them: a file open per shard per
read, the chunk B-tree, Fletcher-32 recomputed on every chunk, a copy into a buffer.  A
shard's ``features`` are written one row per chunk, uncompressed, with Fletcher-32 alone:
each chunk is the row's bytes followed by 4 checksum bytes.  So once a shard's layout is
known to be that one, the rows are plain bytes at known offsets of the file, and the
dropout kernel can read them from the mapped pages directly (no copy).

Integrity.  A shard is mapped the first time this process reads it: its file is opened once,
mapped, and the descriptor closed (the mapping holds the file; it is never reopened by path),
and the SHA-256 of its rows, read at the recorded chunk offsets in that mapping, is compared
with the index's record -- the same check as before, on the very bytes later reads use.  On
a mismatch the rows are read again through h5py so that Fletcher-32 names the damage it can
see, as before.  Covered after the check: every later read first stats the shard's path; the
same file with other times has its mapped rows re-hashed against the record (damage stops the
run, a mere chmod or touch does not), and a change of size is damage.  Not covered: a change
made in place while an epoch is reading, or one that also restores both times (ctime is set
only by the clock); a file truncated under a running read ends the process with SIGBUS; a file
renamed over the shard's path is not what the mapping reads (it keeps the checked bytes, and
the next process checks the new file).  Shards are immutable once written, so any of these is
tampering or a failing disk, not covfeat's own doing.

A layout other than the expected one (compression, other filters, a chunk that is not one
row, a chunk not where it should be, a byte order other than this machine's) is refused
with its reason and read through h5py as before: never guessed at.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import sys
import weakref
from dataclasses import dataclass

import h5py
import numpy as np

from covfeat.core.lazyjit import lazy_njit, prange, usable_cores


@dataclass
class MappedShard:
    """One checked shard file, mapped read-only (its pages stay mapped while any array of them
    lives; no file descriptor is kept, so a million-image cache needs none per shard)."""

    path: str
    words: np.ndarray  # the whole file as elements of the features' dtype (read-only, C)
    offsets: np.ndarray  # per local row: element offset of its first value in ``words``
    row_len: int  # elements per row
    stamp: tuple  # (dev, ino, size, mtime_ns, ctime_ns) of the file mapped, when checked
    expected: str  # the features' SHA-256 the index records

    def rows_sha256(self) -> str:
        h = hashlib.sha256()
        mv = memoryview(self.words).cast("B")
        b = self.words.itemsize
        for o in self.offsets:
            h.update(mv[int(o) * b:(int(o) + self.row_len) * b])
        return h.hexdigest()

    def changed(self) -> str | None:
        """None when the mapped file is as checked (re-hashing it if its times moved), else why not.

        A file now at the path that is another file (renamed over it) leaves the mapping on
        the checked one, whose bytes the reads keep using: None."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if stamp == self.stamp or stamp[:2] != self.stamp[:2]:
            return None
        if st.st_size != self.stamp[2]:
            return "its size changed after this process checked it"
        if self.rows_sha256() != self.expected:
            return "changed"
        self.stamp = stamp
        return None


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
    """Open ``path`` once, map it read-only and close the descriptor; the caller compares
    ``rows_sha256()`` with the record.  The mapping is undone when the last array over it goes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        # MAP_POPULATE: the check reads every row at once, so its pages are mapped in one call, not faulted in
        addr = _libc.mmap(None, st.st_size, mmap.PROT_READ, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"cannot map {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    elem = np.uint16 if dtype == np.float16 else np.float32
    buf = (ctypes.c_uint16 if elem == np.uint16 else ctypes.c_float) * (st.st_size // np.dtype(elem).itemsize)
    buf = buf.from_address(addr)
    weakref.finalize(buf, _libc.munmap, addr, st.st_size)
    words = np.frombuffer(buf, elem)
    words.flags.writeable = False  # PROT_READ: a write would be a segmentation fault, so numpy refuses it
    return MappedShard(str(path), words, offsets, row_len,
                       (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), expected)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class MappedFiles:
    """The process's mapped shards as one numba typed List, and each shard's place in it."""

    def __init__(self):
        self.files = None
        self.slot: dict[int, int] = {}
        self.sample_slot = self.sample_offset = None  # per sample of the cache: its shard's slot, its row's offset

    def add(self, i: int, m: MappedShard, start: int, n_samples: int) -> None:
        if self.files is None:
            from numba import typed  # numba only once a shard is mapped (covfeat.core.lazyjit)

            self.files = typed.List()
            self.sample_slot = np.full(n_samples, -1, np.int64)
            self.sample_offset = np.full(n_samples, -1, np.int64)
        self.slot[i] = len(self.files)
        self.files.append(m.words)
        self.sample_slot[start:start + len(m.offsets)] = self.slot[i]
        self.sample_offset[start:start + len(m.offsets)] = m.offsets


@lazy_njit(parallel=True, cache=True, nogil=True)
def gather_mapped(files, slot, offset, out, where):
    """out[where[i]] = the row at ``files[slot[i]][offset[i]:]``: rows of every mapped shard in one
    call (a call of a parallel kernel costs a thread wake-up, once per shard it grew with them)."""
    n, m = slot.shape[0], out.shape[1]
    for i in prange(n):
        w = files[slot[i]]
        o = offset[i]
        d = out[where[i]]
        for j in range(m):
            d[j] = w[o + j]


@lazy_njit(parallel=True, cache=True, nogil=True)
def gather_mapped_f16(files, slot, offset, out, where, lut):
    """:func:`gather_mapped` of float16 bit patterns into float32 rows (``lut``: every pattern's value)."""
    n, m = slot.shape[0], out.shape[1]
    for i in prange(n):
        w = files[slot[i]]
        o = offset[i]
        d = out[where[i]]
        for j in range(m):
            d[j] = lut[w[o + j]]


def mapped_and_hashed(jobs: list):
    """For each (key, arguments of :func:`map_shard`) of ``jobs``, in order: (key, arguments, the
    mapped shard, the SHA-256 of its rows), the mapping and hashing done on every usable core
    (hashlib releases the GIL).  Each worker maps a shard and hashes it at once, and at most two
    shards per worker are mapped ahead of the one handed out, so a cache larger than memory is
    read once; when the caller stops (an error, Ctrl-C), only the running hashes are waited for."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def check(args):
        m = map_shard(*args)
        return m, m.rows_sha256()

    workers = min(len(jobs), usable_cores())
    if workers <= 1:
        for key, args in jobs:
            yield (key, args, *check(args))
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    ahead: deque = deque()
    queue = iter(jobs)
    try:
        while True:
            while len(ahead) < 2 * workers and (nxt := next(queue, None)) is not None:
                ahead.append((*nxt, pool.submit(check, nxt[1])))
            if not ahead:
                return
            key, args, fut = ahead.popleft()
            yield (key, args, *fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@lazy_njit(parallel=True, cache=True, nogil=True)
def _no_inf_nan(bits, exp_mask):
    """True when no element has every exponent bit set (inf or NaN), rows in parallel."""
    bad = np.zeros(bits.shape[0], np.bool_)
    for i in prange(bits.shape[0]):
        row = bits[i]
        hit = False
        for j in range(row.shape[0]):
            hit |= (row[j] & exp_mask) == exp_mask
        bad[i] = hit
    return not bad.any()


def all_finite(a: np.ndarray) -> bool:
    """np.isfinite(a).all() for float16 / float32 arrays, from the bit patterns in compiled
    code (numpy's float16 isfinite is emulated: 0.8 s for a 450 MB pool, this ~20 ms)."""
    a = np.ascontiguousarray(a)
    if a.size == 0:
        return True
    if a.dtype == np.float16:
        return bool(_no_inf_nan(a.reshape(len(a), -1).view(np.uint16), np.uint16(0x7C00)))
    if a.dtype == np.float32:
        return bool(_no_inf_nan(a.reshape(len(a), -1).view(np.uint32), np.uint32(0x7F800000)))
    return bool(np.isfinite(a).all())
