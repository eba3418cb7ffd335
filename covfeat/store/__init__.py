"""The feature store between the two stages: immutable shard files (``shards``), the index
over them (``index``), the reader with its float16 loader and finiteness check (``reader``),
the catalog of a cache folder (``catalog``: choose, describe, verify, move aside, clean), the
cache key (``key``) and the lock (``lock``).  Stage one writes it; stage two reads it."""
