"""Named extension points: one small registry shape for backbones, data layouts and audit probes.

After timm's model registry: an entry is a frozen dataclass carrying its own ``name`` and
everything else about it, and adding one is one :meth:`Registry.register` call in the module
that defines it.  Entries keep their registration order, because some callers ask them in
turn (the first data layout that recognises a folder wins; the audit runs its probes in order).

A registry reads like a dict of its entries by name (``reg[name]``, ``name in reg``, iteration
over the names, ``items()``), so callers and tests that treat it as one keep working; its
:meth:`~Registry.get` without a default is the lookup for user input, whose error lists the
registered names.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from covfeat.core.errors import ConfigError

T = TypeVar("T")

_MISSING = object()


class Registry(Generic[T]):
    """Entries by name, in registration order.

    Parameters
    ----------
    what
        What an entry is, for errors: ``"backbone"``, ``"data layout"``, ``"audit probe"``.
    option
        The command-line option that names an entry (``"--backbone"``), if any; an unknown name
        is then reported against it.
    """

    def __init__(self, what: str, option: str | None = None):
        self.what = what
        self.option = option
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry`` under its ``name``; returns it, so a definition can be registered where
        it is made.

        Raises
        ------
        ConfigError
            An entry of that name is registered already (two definitions would shadow each other).
        """
        name = entry.name
        if name in self._entries:
            raise ConfigError(f"A {self.what} named {name!r} is already registered.")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (tests that register one undo it this way)."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def get(self, name: str, default=_MISSING):
        """The entry ``name``; ``default`` when given and there is none.

        Raises
        ------
        ConfigError
            No such entry and no default: the error names the registered ones.
        """
        if name in self._entries:
            return self._entries[name]
        if default is not _MISSING:
            return default
        where = f"{self.option}: expected" if self.option else "Expected"
        raise ConfigError(f"{where} a registered {self.what}, one of {', '.join(self._entries)}; got {name!r}.")

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self._entries)

    def values(self) -> list[T]:
        """Every registered entry, in registration order."""
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        """Put ``entry`` under ``name``, replacing any: what ``monkeypatch.setitem`` does for the
        length of one test.  Code that adds an entry for good calls :meth:`register`."""
        if entry.name != name:
            raise ConfigError(f"A {self.what} named {entry.name!r} cannot be registered as {name!r}.")
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"
