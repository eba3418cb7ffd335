"""numba kernels compiled on first call, so importing a module that defines them costs nothing.

Importing numba takes about half a second, more than ``covfeat info`` on a small cache should
take in all (covfeat issue 20, item 3), and most commands never call a kernel.  A kernel
decorated with :func:`lazy_njit` is a plain Python object until it is first called; then numba
is imported, and every lazy kernel of that module is compiled (``njit`` with the options given,
``cache=True`` as before, so the compiled code still comes from numba's on-disk cache) and put in
the module's namespace in place of its stand-in.  Kernels calling kernels of their own module
therefore see numba dispatchers when numba types them, exactly as with ``@njit``.
"""

from __future__ import annotations

import os
import sys
from functools import update_wrapper


class LazyKernel:
    """A stand-in for ``njit(**options)(func)`` until the first call."""

    def __init__(self, func, options: dict):
        self.py_func = func
        self.options = options
        self.compiled = None
        update_wrapper(self, func)

    def __call__(self, *args):
        if self.compiled is None:  # a caller that imported the stand-in keeps it: it calls through
            self.compiled = compile_module(self.py_func.__module__)[self.py_func.__name__]
        return self.compiled(*args)


def prange(*args):
    """``numba.prange`` in a lazy kernel (replaced by it when the module's kernels compile); ``range`` in Python."""
    return range(*args)


def lazy_njit(**options):
    """``@njit(**options)``, compiled (and numba imported) only when the kernel is first called."""
    def wrap(func):
        return LazyKernel(func, options)
    return wrap


class LazyIntrinsic:
    """A stand-in for a numba ``@intrinsic``, which needs numba and llvmlite to be defined: the
    factory that makes it runs when the kernels of its module compile."""

    def __init__(self, factory):
        self.factory = factory

    def load(self):
        return self.factory()


def lazy_intrinsic(factory) -> LazyIntrinsic:
    """The intrinsic ``factory()`` returns, for the lazy kernels of the module that assigns this
    to a global.  Define the factory in that module: numba's cache of a kernel follows its own
    file, so an intrinsic written elsewhere could change without the cached kernels noticing."""
    return LazyIntrinsic(factory)


def compile_module(name: str) -> dict:
    """Replace every lazy kernel defined in module ``name`` by its numba dispatcher (and every
    lazy intrinsic by the intrinsic); its namespace."""
    import numba

    space = vars(sys.modules[name])
    for attr, value in list(space.items()):
        if value is prange:
            space[attr] = numba.prange
        elif isinstance(value, LazyIntrinsic):
            space[attr] = value.load()
    for attr, value in list(space.items()):
        if isinstance(value, LazyKernel) and value.py_func.__module__ == name:
            space[attr] = numba.njit(**value.options)(value.py_func)
    return space


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def map_nogil(fn, items, parallel: bool) -> list:
    """``[fn(x) for x in items]``, on every usable core when ``parallel`` (``fn`` a kernel
    compiled with ``nogil=True``, or a function spending its time in one): threads, in order."""
    items = list(items)
    workers = min(len(items), usable_cores()) if parallel else 1
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))
