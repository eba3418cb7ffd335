"""Every setting of covfeat, as frozen dataclasses that check themselves and derive the cache key.

Each field carries a :class:`Rule` (what it accepts); ``validate()`` checks every field
and the cross-field constraints before any work, and raises :class:`ConfigError` in one
style: the setting's name, what was expected, what was given.  Constructing a config
validates it, so a bad value never reaches a computation.

* :class:`ExtractConfig` -- stage one (what changes the cached features);
* :class:`SplitConfig` -- train / validation / test assignment (stage two);
* :class:`HeadConfig` -- the paper's head and its training (Table 1, section 4.3);
* :class:`FitConfig` -- one ``fit-head`` call: head + split + operating point + CV.

The cache key is *derived*: every :class:`ExtractConfig` field enters it except those
named, with the reason, in :data:`NOT_IN_KEY`.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError


# --------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Rule:
    """What one setting accepts: a predicate and the words that describe it."""

    expected: str
    ok: Callable[[Any], bool]


def _is_int(v) -> bool:
    import numpy as np

    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    import numpy as np

    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    desc = "an integer" + (f" from {lo} to {hi}" if lo is not None and hi is not None
                           else f" >= {lo}" if lo is not None else "")
    return Rule(desc, lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Rule:
    if lo is not None and hi is not None:
        desc = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        desc = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        desc = "a number"

    def ok(v):
        if not _is_number(v):
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


def setting(default=MISSING, rule: Rule | None = None, *, flag: str | None = None, factory=MISSING, nested=False):
    """A dataclass field with its rule and the command-line flag that sets it."""
    meta = {"rule": rule, "flag": flag, "nested": nested}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


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
        return _plain(self)


def _plain(obj):
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
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
            sub = _nested_type(cls, k)
            if not isinstance(v, dict):
                raise fail(f"{origin}: {k}", "a table of settings", v)
            v = from_dict(sub, v, f"{origin}: {k}")
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def _nested_type(cls, name):
    return {"jitter": JitterConfig, "occlusion": OcclusionConfig, "head": HeadConfig, "split": SplitConfig}[name]


# --------------------------------------------------------------------------- stage one

@dataclass(frozen=True)
class JitterConfig(Checked):
    """Ranges of the random jitter (the meaning ImageDataGenerator gives each range)."""

    rotation: float = setting(15.0, number(0, 180))  # degrees, uniform in [-r, r]
    shift: float = setting(0.1, number(0, 0.5))  # fraction of the side, uniform in [-s, s]
    zoom: float = setting(0.1, number(0, 1, hi_open=True))  # scale uniform in [1-z, 1+z]


def _box_ok(b) -> bool:
    return (isinstance(b, (tuple, list)) and len(b) == 4 and all(_is_number(x) and 0 <= x <= 1 for x in b)
            and b[0] < b[2] and b[1] < b[3])


@dataclass(frozen=True)
class OcclusionConfig(Checked):
    """What the occlusion probe blanks before extraction: nothing, a central box, or lung masks."""

    kind: str = setting("none", one_of("none", "box", "masks"), flag="--occlude")
    box: tuple[float, float, float, float] = setting(
        (0.15, 0.1, 0.85, 0.9), Rule("four fractions x0 < x1, y0 < y1 in [0, 1]", _box_ok))
    masks: str = setting("", Rule("a string", lambda v: isinstance(v, str)))  # folder of masks named like the images
    fill: float = setting(127.5, number(0, 255))  # constant on the [0, 255] scale

    def _check(self):
        if self.kind == "masks" and not Path(self.masks).is_dir():
            raise fail("--occlude", "a folder of lung masks", self.masks)

    @classmethod
    def parse(cls, text: str) -> "OcclusionConfig":
        """The --occlude flag: none, box, or a folder of masks."""
        if text in ("none", "box"):
            return cls(kind=text)
        return cls(kind="masks", masks=str(text))


def _backbone_rule() -> Rule:
    from .backbones import list_backbones

    names = list_backbones()
    return Rule("a registered backbone, one of " + ", ".join(names), lambda v: isinstance(v, str) and v in names)


@dataclass(frozen=True)
class ExtractConfig(Checked):
    """Stage one: everything that decides the cached feature maps (see NOT_IN_KEY)."""

    backbone: str = setting(MISSING, None, flag="--backbone")  # rule: the registry, at validation time
    weights: str = setting("imagenet", TEXT, flag="--weights")
    preprocess: str = setting("paper", one_of("paper", "backbone"), flag="--preprocess")
    augment: int = setting(4, integer(0, 100), flag="--augment")
    seed: int = setting(0, integer(0), flag="--seed")
    views: tuple[str, ...] = setting(("PA",), STRINGS, flag="--views")
    dtype: str = setting("float16", one_of("float16", "float32"), flag="--dtype")
    jitter: JitterConfig = setting(factory=JitterConfig, nested=True)
    occlusion: OcclusionConfig = setting(factory=OcclusionConfig, nested=True)
    scaled_decode: bool = setting(True, BOOL, flag="--full-decode")  # large JPEGs decoded at 1/2..1/8 scale
    max_pixels: int = setting(64_000_000, integer(1), flag="--max-pixels")  # read from the header, before decoding
    max_file_mb: float = setting(256.0, number(0, lo_open=True), flag="--max-file-mb")
    min_side: int = setting(64, integer(1), flag="--min-side")
    max_aspect: float = setting(4.0, number(1), flag="--max-aspect")  # longer side / shorter side
    on_conflict: str = setting("error", one_of("error", "skip"), flag="--on-conflict")
    batch_size: int = setting(16, integer(1, 4096), flag="--batch-size")
    workers: int = setting(2, integer(1, 64), flag="--workers")

    def _rule(self, f):
        return _backbone_rule() if f.name == "backbone" else f.metadata.get("rule")

    def _check(self):
        if not isinstance(self.jitter, JitterConfig) or not isinstance(self.occlusion, OcclusionConfig):
            raise ConfigError("jitter and occlusion must be JitterConfig and OcclusionConfig.")

    def pipeline(self):
        """The decoding and scaling these features were made with (shared with inference)."""
        from .images import InputPipeline

        return InputPipeline.for_config(self)

    @classmethod
    def from_stored(cls, stored: dict, weights: str | None = None) -> "ExtractConfig":
        """The config recorded in a cache (its key fields), with ``weights`` as the argument
        that reproduces its weights (the stored identity is a hash, not a path)."""
        names = {f.name for f in fields(cls)} - set(NOT_IN_KEY)
        values = {k: stored[k] for k in names if k in stored}
        values["weights"] = weights if weights is not None else stored["weights"]["kind"]
        return from_dict(cls, values, "the cache's config")


# Fields of ExtractConfig that do NOT enter the cache key, each with its reason.  Every
# other field does, defaults included; tests/test_config.py derives the fields from the
# dataclass, so a new field enters the key unless it is added here with a reason.
NOT_IN_KEY = {
    "weights": "replaced by the resolved weights identity (a file's hash, never its path)",
    "batch_size": "the forward pass's batch size does not change the features",
    "workers": "the number of decoding threads does not change the features",
    "on_conflict": "decides which files enter the manifest, whose content and labels are in the key already",
}


def key_config(cfg: ExtractConfig, weights_identity: str) -> dict:
    """The part of an extraction config that the cache key is a hash of."""
    out = {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in NOT_IN_KEY}
    out["weights"] = {"identity": weights_identity}
    return out


def _shard_ok(v) -> bool:
    return v is None or (isinstance(v, tuple) and len(v) == 2 and all(_is_int(x) for x in v) and 0 <= v[0] < v[1])


@dataclass(frozen=True)
class DriverConfig(Checked):
    """Who computes the shards of an extraction; never changes the numbers (no field is keyed)."""

    engine: str = setting("local", one_of("local", "ray"), flag="--engine")
    address: str | None = setting(None, optional(TEXT, "an embedded local Ray, or RAY_ADDRESS"), flag="--address")
    ray_workers: int = setting(2, integer(1, 10000), flag="--ray-workers")  # actors, each holding the model once
    cpus_per_worker: float = setting(0.5, number(0, lo_open=True), flag="--cpus-per-worker")
    gpus_per_worker: float = setting(0.0, number(0), flag="--gpus-per-worker")
    shard: tuple[int, int] | None = setting(None, Rule("i/N with 0 <= i < N", _shard_ok), flag="--shard")

    def _check(self):
        if self.shard is not None and self.engine == "ray":
            raise fail("--shard", "the local engine (a slice per process, for array jobs)", "with --engine ray")

    @staticmethod
    def parse_shard(text: str | None) -> tuple[int, int] | None:
        if text is None:
            return None
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise fail("--shard", "i/N with 0 <= i < N", text) from None
        return (i, n)


# --------------------------------------------------------------------------- stage two

@dataclass(frozen=True)
class SplitConfig(Checked):
    """Train / validation / test, stratified and grouped; a stage-two setting of fit-head."""

    val: float = setting(0.1, number(0, 1, hi_open=True), flag="--val")
    test: float = setting(0.3, number(0, 1, lo_open=True, hi_open=True), flag="--test")  # the paper's 324 of 1,079
    by: str = setting("patient", one_of("patient", "image"), flag="--split-by")
    seed: int = setting(0, integer(0), flag="--split-seed")
    near_duplicates: str = setting("group", one_of("group", "ignore"), flag="--near-duplicates")  # keep pairs together

    def _check(self):
        if self.val + self.test >= 1:
            raise fail("--val + --test", "a sum below 1, leaving training rows", round(self.val + self.test, 6))


@dataclass(frozen=True)
class HeadConfig(Checked):
    """The paper's head and its training (Table 1, section 4.3); every field is a flag and a config-file key."""

    dropout: float | None = setting(None, optional(number(0, 1, hi_open=True), "the paper's rate for the backbone"),
                                    flag="--dropout")
    dense_units: int = setting(128, integer(1, 65536), flag="--dense-units")
    activity_l1: float = setting(1e-3, number(0), flag="--activity-l1")
    activity_l2: float = setting(1e-3, number(0), flag="--activity-l2")
    epochs: int = setting(100, integer(1, 100000), flag="--epochs")
    batch_size: int = setting(8, integer(1, 1 << 20), flag="--batch-size")
    learning_rate: float = setting(1e-4, number(0, 10, lo_open=True), flag="--learning-rate")
    momentum: float = setting(0.5, number(0, 1, hi_open=True), flag="--momentum")
    balance: str = setting("smote", one_of("smote", "none", "class-weight"), flag="--balance")
    smote_k: int = setting(5, integer(1, 1000), flag="--smote-k")
    seed: int = setting(0, integer(0), flag="--seed")
    engine: str = setting("numba", one_of("numba", "tf"), flag="--engine")  # same maths, two implementations

    def resolved(self, backbone) -> "HeadConfig":
        """Dropout resolved once: the paper's rate for ``backbone`` when unset."""
        return self if self.dropout is not None else replace(self, dropout=backbone.dropout)


@dataclass(frozen=True)
class FitConfig(Checked):
    """One fit-head call: the head, the split, an optional operating point, cross-validation."""

    head: HeadConfig = setting(factory=HeadConfig, nested=True)
    split: SplitConfig = setting(factory=SplitConfig, nested=True)
    target_recall: float | None = setting(None, optional(number(0, 1, lo_open=True), "the argmax rule"),
                                          flag="--target-recall")
    folds: int = setting(0, Rule("0 (the split) or an integer from 2 to 100",
                                 lambda v: _is_int(v) and (v == 0 or 2 <= v <= 100)), flag="--folds")
    repeats: int = setting(1, integer(1, 100), flag="--repeats")
    memory_budget_gb: float = setting(8.0, number(0, lo_open=True), flag="--memory-budget")

    def _check(self):
        if self.target_recall is not None and self.split.val == 0:
            raise ConfigError("--target-recall: picks the threshold on validation rows; expected --val > 0, got 0.")
        if self.repeats > 1 and not self.folds:
            raise fail("--repeats", "--folds as well (repeats are of cross-validation)", self.repeats)
        if self.folds and self.split.val / (1 - 1 / self.folds) >= 1:
            raise fail("--val", f"a share below {1 - 1 / self.folds:g} with --folds {self.folds} (the validation share "
                       "is carved from each fold's training part)", self.split.val)

    def resolved(self, backbone) -> "FitConfig":
        return replace(self, head=self.head.resolved(backbone))

    def run_dict(self) -> dict:
        """What a run records of its settings (memory_budget_gb only decides where maps live)."""
        d = self.as_dict()
        d.pop("memory_budget_gb")
        return d


# Keys of a fit-head config file (and the flags): head fields as they are, the rest here.
FIT_KEYS = {"val": ("split", "val"), "test": ("split", "test"), "split_by": ("split", "by"),
            "split_seed": ("split", "seed"), "near_duplicates": ("split", "near_duplicates"), "target_recall": (None, "target_recall"), "folds": (None, "folds"),
            "repeats": (None, "repeats"), "memory_budget": (None, "memory_budget_gb")}


def fit_config(file: str | Path | None = None, **flags) -> FitConfig:
    """Defaults (the paper) <- a JSON or TOML file's keys <- flags given (None = not given).

    Keys are the head's fields (``epochs``, ``learning_rate``, ...) and those of
    :data:`FIT_KEYS`.  Raises ConfigError naming the file, the key and the value.
    """
    values: dict = {}
    origin = "flags"
    if file is not None:
        file = Path(file)
        origin = str(file)
        try:
            text = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read the config file ({exc}).") from None
        try:
            if file.suffix.lower() == ".toml":
                import tomllib

                values = tomllib.loads(text)
            else:
                values = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{file}: not valid {'TOML' if file.suffix.lower() == '.toml' else 'JSON'} ({exc}).") \
                from None
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: expected a table of settings, got {type(values).__name__}.")
        values = dict(values)
    head_keys = {f.name for f in fields(HeadConfig)}
    known = head_keys | set(FIT_KEYS)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {unknown}; known: {sorted(known)}.")
    for k, v in values.items():  # check a file's values by their key names before flags override them
        _check_key(k, v, origin)
    values.update({k: v for k, v in flags.items() if v is not None})
    head = {k: v for k, v in values.items() if k in head_keys}
    split = {FIT_KEYS[k][1]: v for k, v in values.items() if k in FIT_KEYS and FIT_KEYS[k][0] == "split"}
    top = {FIT_KEYS[k][1]: v for k, v in values.items() if k in FIT_KEYS and FIT_KEYS[k][0] is None}
    return FitConfig(head=HeadConfig(**head), split=SplitConfig(**split), **top)


def _check_key(key: str, value, origin: str) -> None:
    where, name = FIT_KEYS.get(key, ("head", key))
    cls = {"head": HeadConfig, "split": SplitConfig, None: FitConfig}[where]
    f = next(f for f in fields(cls) if f.name == name)
    rule = f.metadata["rule"]
    if rule is not None and not rule.ok(value):
        raise fail(f"{origin}: {key}", rule.expected, value)


__all__ = ["DriverConfig", "ExtractConfig", "SplitConfig", "HeadConfig", "FitConfig", "JitterConfig", "OcclusionConfig",
           "NOT_IN_KEY", "key_config", "fit_config", "from_dict", "asdict"]
