"""The exceptions covfeat raises for problems a user can act on.

The command line turns every :class:`CovfeatError` into one line on stderr and exit
code 1; anything else is a bug and keeps its traceback.  Each specific error also
inherits the matching built-in so Python callers can catch either.
"""

from __future__ import annotations


class CovfeatError(Exception):
    """Base class of every expected, user-actionable covfeat error."""


class DataError(CovfeatError, ValueError):
    """The input data cannot be used as given (no images, one class, bad layout)."""


class SourceNotFound(CovfeatError, FileNotFoundError):
    """A --data source or a named file does not exist."""


class WeightsUnavailable(CovfeatError, OSError):
    """Backbone weights cannot be had (offline and not cached, or a bad file)."""


class CacheError(CovfeatError, ValueError):
    """A feature cache is missing, incomplete, stale or of the wrong kind."""


class CacheLocked(CovfeatError, OSError):
    """Another process is writing the same cache."""


class RunError(CovfeatError, ValueError):
    """A run folder is missing, incomplete or does not match its cache."""


class ConfigError(CovfeatError, ValueError):
    """An option or config value is out of range or inconsistent."""


class FileUnavailable(CovfeatError, OSError):
    """A listed file cannot be read now (permissions, an unmounted share): not a bad image, so
    extraction stops instead of recording a skip that would last in an immutable shard."""


class FileChanged(CovfeatError, OSError):
    """A listed file's bytes are not the ones hashed when it was listed (replaced, another copy
    on a Ray node, a Git LFS pointer): features computed from them would be stored under the
    old file's hash, so extraction stops instead."""


class OutOfMemory(CovfeatError, MemoryError):
    """Memory ran out while decoding a file: a passing state of the machine, not a property of
    the file, so extraction stops instead of recording a skip that would last."""
