"""Stage two's settings: the split, the paper's head and its training, and one fit-head call.

* :class:`SplitConfig` -- train / validation / test assignment;
* :class:`HeadConfig` -- the paper's head and its training (Table 1, section 4.3);
* :class:`FitConfig` -- one ``fit-head`` call: head + split + operating point + CV.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from covfeat.core.errors import ConfigError
from covfeat.core.settings import Checked, Rule, _is_int, fail, integer, number, one_of, optional, setting

# --------------------------------------------------------------------------- rules


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
