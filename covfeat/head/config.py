"""Stage two's settings: the split, the paper's head and its training, and one fit-head call.

* :class:`SplitConfig` -- train / validation / test assignment;
* :class:`HeadConfig` -- the paper's head and its training (Table 1, section 4.3);
* :class:`FitConfig` -- one ``fit-head`` call: head + split + operating point + CV.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from covfeat.core.errors import ConfigError
from covfeat.core.settings import (
    Checked,
    Rule,
    fail,
    flagged,
    from_dict,
    integer,
    is_int,
    number,
    one_of,
    option_name,
    optional,
    setting,
)

# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class SplitConfig(Checked):
    """Train / validation / test, stratified and grouped; a stage-two setting of fit-head."""

    val: float = setting(0.1, number(0, 1, hi_open=True), flag="--val", help="Validation share")
    test: float = setting(0.3, number(0, 1, lo_open=True, hi_open=True), flag="--test",  # the paper's 324 of 1,079
                          help="Test share")
    by: str = setting("patient", one_of("patient", "image"), flag="--split-by",
                      help="patient (no patient in two splits) or image (the paper's naive split)")
    seed: int = setting(0, integer(0), flag="--split-seed", help="Seed of the split and the folds")
    near_duplicates: str = setting("group", one_of("group", "ignore"), flag="--near-duplicates",  # pairs kept together
                                   help="group (near-duplicate images on one side of every split) or ignore")

    def _check(self):
        if self.val + self.test >= 1:
            raise fail("--val + --test", "a sum below 1, leaving training rows", round(self.val + self.test, 6))


def _paper_dropout() -> str:
    from covfeat.extraction.backbones import REGISTRY

    return "the paper's rate: " + ", ".join(f"{n} {b.dropout:g}" for n, b in REGISTRY.items())


@dataclass(frozen=True)
class HeadConfig(Checked):
    """The paper's head and its training (Table 1, section 4.3).

    Every field is a fit-head flag and a config-file key of its own name, in this order in
    ``covfeat fit-head --help``: a new field needs no edit of the command line."""

    epochs: int = setting(100, integer(1, 100000), flag="--epochs")
    batch_size: int = setting(8, integer(1, 1 << 20), flag="--batch-size")
    learning_rate: float = setting(1e-4, number(0, 10, lo_open=True), flag="--learning-rate",
                                   help="SGD learning rate", shown="1e-4")
    momentum: float = setting(0.5, number(0, 1, hi_open=True), flag="--momentum", help="SGD momentum")
    dropout: float | None = setting(None, optional(number(0, 1, hi_open=True), "the paper's rate for the backbone"),
                                    flag="--dropout", shown=_paper_dropout)
    dense_units: int = setting(128, integer(1, 65536), flag="--dense-units")
    activity_l1: float = setting(1e-3, number(0), flag="--activity-l1")
    activity_l2: float = setting(1e-3, number(0), flag="--activity-l2")
    balance: str = setting("smote", one_of("smote", "none", "class-weight"), flag="--balance",
                           help="smote | none | class-weight")
    smote_k: int = setting(5, integer(1, 1000), flag="--smote-k", help="SMOTE neighbours, reduced for a small minority")
    seed: int = setting(0, integer(0), flag="--seed",
                        help="Seed of SMOTE, the head's initialisation, dropout and shuffling")
    engine: str = setting("numba", one_of("numba", "tf"), flag="--engine",  # same maths, two implementations
                          help="numba (compiled batch steps) | tf (Keras layers in tf.function); same maths")

    def resolved(self, backbone) -> "HeadConfig":
        """Dropout resolved once: the paper's rate for ``backbone`` when unset."""
        return self if self.dropout is not None else replace(self, dropout=backbone.dropout)


@dataclass(frozen=True)
class FitConfig(Checked):
    """One fit-head call: the head, the split, an optional operating point, cross-validation."""

    head: HeadConfig = setting(factory=HeadConfig, nested=True)
    split: SplitConfig = setting(factory=SplitConfig, nested=True)
    target_recall: float | None = setting(None, optional(number(0, 1, lo_open=True), "the argmax rule"),
                                          flag="--target-recall",
                                          help="Pick the threshold on validation rows to reach this COVID-19 recall.")
    folds: int = setting(0, Rule("0 (the split) or an integer from 2 to 100",
                                 lambda v: is_int(v) and (v == 0 or 2 <= v <= 100)), flag="--folds",
                         help="Cross-validation folds (0: one split)")
    repeats: int = setting(1, integer(1, 100), flag="--repeats", help="Cross-validation repeats")
    memory_budget_gb: float = setting(8.0, number(0, lo_open=True), flag="--memory-budget",
                                      help="GiB of training maps held in memory; above it they are streamed from HDF5")

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


def file_keys() -> dict:
    """The keys of a fit-head config file, which are also its flags with _ and the keywords
    of :func:`fit_config`: ``key -> (path of nested fields, field)`` for every flagged setting
    of :class:`FitConfig`, so the head's keys are its field names, the split's are its flags
    (``split_by``, ``split_seed``), and a new field is a key with no edit here."""
    return {option_name(f): (path, f) for path, _, f in flagged(FitConfig)}


def fit_config(file: str | Path | None = None, **flags) -> FitConfig:
    """Defaults (the paper) <- a JSON or TOML file's keys <- flags given (None = not given).

    Keys are those of :func:`file_keys` (``epochs``, ``learning_rate``, ``split_by``, ...).
    Raises ConfigError naming the file, the key and the value.
    """
    values: dict = {}
    keys = file_keys()
    if file is not None:
        file = Path(file)
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
        _check_known(values, keys, str(file))
        for k, v in values.items():  # check a file's values by their key names before flags override them
            _check_key(k, v, str(file), keys)
    _check_known(flags, keys, "flags")
    values.update({k: v for k, v in flags.items() if v is not None})
    nested: dict = {}
    for k, (path, f) in keys.items():  # in declaration order: the head is checked first, as it is declared first
        where = nested
        for name in path:
            where = where.setdefault(name, {})
        if k in values:
            where[f.name] = values[k]
    return from_dict(FitConfig, nested, "flags")


def _check_known(values: dict, keys: dict, origin: str) -> None:
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {unknown}; known: {sorted(keys)}.")


def _check_key(key: str, value, origin: str, keys: dict) -> None:
    rule = keys[key][1].metadata["rule"]
    if rule is not None and not rule.ok(value):
        raise fail(f"{origin}: {key}", rule.expected, value)
