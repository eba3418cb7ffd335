"""How a setting is declared and checked: rules, ``setting(...)``, the self-checking mixin.

Each field of a config dataclass carries a :class:`Rule` (what it accepts), its flag, its
help text and its default, declared once: the command line is built from the declarations
(:func:`flagged`, :func:`help_text`, :func:`shown_default`), as Hugging Face's
``HfArgumentParser`` builds argparse from dataclass fields and their ``metadata``.
``validate()`` checks every field and the cross-field constraints before any work, and
raises :class:`ConfigError` in one style: the setting's name, what was expected, what was
given.  The stage configs (:mod:`covfeat.extraction.config`, :mod:`covfeat.head.config`) are
built from these.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from covfeat.core.errors import ConfigError

# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """What one setting accepts: a predicate and the words that describe it."""

    expected: str
    ok: Callable[[Any], bool]


def is_int(v) -> bool:
    """An integer, numpy's included; not a bool (True is not a count)."""
    import numpy as np

    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite number, numpy's included; not a bool."""
    import numpy as np

    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    desc = "an integer" + (f" from {lo} to {hi}" if lo is not None and hi is not None
                           else f" >= {lo}" if lo is not None else "")
    return Rule(desc, lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Rule:
    if lo is not None and hi is not None:
        desc = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        desc = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        desc = "a number"

    def ok(v):
        if not is_number(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        if hi is not None and (v >= hi if hi_open else v > hi):
            return False
        return True

    return Rule(desc, ok)


def one_of(*choices: str) -> Rule:
    return Rule("one of " + ", ".join(repr(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


def optional(rule: Rule, none_means: str) -> Rule:
    return Rule(f"{rule.expected}, or unset ({none_means})", lambda v: v is None or rule.ok(v))


TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))


BOOL = Rule("true or false", lambda v: isinstance(v, bool))


STRINGS = Rule("a non-empty list of non-empty strings",
               lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(isinstance(s, str) and s.strip() for s in v))


def setting(default=MISSING, rule: Rule | None = None, *, flag: str | None = None, short: str | None = None,
            help: str | Callable[[], str] | None = None, shown: str | Callable[[], str] | None = None,
            factory=MISSING, nested=False):
    """A dataclass field with its rule and, when the command line sets it, its flag (and short
    form), its help text and how its default reads in that help.

    ``help`` and ``shown`` may be callables, for texts made from a registry when the command
    line is built; ``shown`` is needed only where the default's plain form would mislead
    (``None`` meaning "the paper's rate", or ``1e-4`` written as the paper writes it).
    """
    meta = {"rule": rule, "flag": flag, "short": short, "help": help, "shown": shown, "nested": nested}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flagged(cls, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], type, Any]]:
    """``(path, owner, field)`` of every field of ``cls`` that has a flag, in declaration order,
    nested configs included in their place (``path`` names the nested fields above it, and
    ``owner`` is the dataclass that declares the field)."""
    for f in fields(cls):
        if f.metadata.get("nested"):
            yield from flagged(f.default_factory, path + (f.name,))  # a nested config's class is its own factory
        elif f.metadata.get("flag"):
            yield path, cls, f


def option_name(f) -> str:
    """A flagged setting's name as a keyword and a config-file key: its flag without the dashes, with _."""
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def help_text(f) -> str:
    """The declared help text of a setting ("" when it has none)."""
    h = f.metadata.get("help")
    return (h() if callable(h) else h) or ""


def default_of(f):
    """A field's default (made by its factory if it has one); MISSING when it has none."""
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def shown_default(f) -> str | None:
    """How a setting's default reads in help: its declared ``shown`` text, else numbers as
    ``:g`` and the rest as ``str``; None for an unset default with nothing to say."""
    shown = f.metadata.get("shown")
    if shown is not None:
        return shown() if callable(shown) else shown
    d = default_of(f)
    if d is MISSING or d is None:
        return None
    return f"{d:g}" if isinstance(d, float) else str(d)


def _name(f) -> str:
    return f.metadata.get("flag") or f.name


def fail(name: str, expected: str, got) -> ConfigError:
    """The one style of every setting error: name, what was expected, what was given."""
    return ConfigError(f"{name}: expected {expected}, got {got!r}.")


class Checked:
    """Mixin: validate on construction (and on ``dataclasses.replace``)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("nested"):
                continue  # a nested config validated itself when it was made
            rule = self._rule(f)
            if rule is not None and not rule.ok(v):
                raise fail(_name(f), rule.expected, v)
        self._check()

    def _rule(self, f) -> Rule | None:
        return f.metadata.get("rule")

    def _check(self) -> None:
        """Cross-field constraints."""

    def as_dict(self) -> dict:
        return plain(self)


def plain(obj):
    """A config as JSON-ready values: dataclasses as dicts, tuples as lists, paths as strings."""
    if is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_dict(cls, values: dict, origin: str = "config"):
    """Build a config from plain values (JSON / TOML / a stored config): unknown keys, wrong
    types and nested dicts are handled here, each error naming the key and its origin."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {unknown}; known: {sorted(known)}.")
    kw = {}
    for k, v in values.items():
        f = known[k]
        if f.metadata.get("nested"):
            sub = f.default_factory  # a nested config's class is its own factory
            if not isinstance(v, dict):
                raise fail(f"{origin}: {k}", "a table of settings", v)
            v = from_dict(sub, v, f"{origin}: {k}")
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)
