"""Per-shard claims: a run computes only the shards it holds a claim on, so two extractions of
one cache started together split the work instead of both computing every shard.

A claim is an exclusive flock on ``<shards>/.<shard name>.claim`` (:class:`FileLock`: no
symlink followed, the holder's "host pid" inside); the OS drops it when its holder dies, so a
killed run never leaves a shard claimed.  The holder removes the claim file when it lets go.
"""

from __future__ import annotations

from pathlib import Path

from covfeat.store.lock import Busy, FileLock, describe_holder


def claim_path(shard: Path) -> Path:
    return shard.with_name(f".{shard.name}.claim")


class Claims:
    """The claims this process holds on shards of one shard folder."""

    def __init__(self):
        self.held: dict[Path, FileLock] = {}

    def take(self, shards: list[Path]) -> tuple[list[Path], dict[Path, str]]:
        """Claim every shard of ``shards`` not claimed by another process and not yet present.
        Returns (claimed, {shard: who holds it}) for those left to others."""
        mine, others = [], {}
        for shard in shards:
            lock = FileLock(claim_path(shard))
            try:
                lock.acquire()
            except Busy as exc:
                others[shard] = describe_holder(exc.holder)
                continue
            if shard.is_file():  # finished by another run since it was found missing
                lock.release(remove=True)
                continue
            self.held[shard] = lock
            mine.append(shard)
        return mine, others

    def release(self) -> None:
        for lock in self.held.values():
            lock.release(remove=True)
        self.held.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def wait_for(shard: Path) -> None:
    """Block until no other process holds a claim on ``shard`` (then it is written, or its
    writer died and the caller computes it)."""
    lock = FileLock(claim_path(shard), wait=True)
    lock.acquire()
    lock.release(remove=True)
