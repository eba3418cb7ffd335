"""Which deviations from the paper apply to a run is read from the settings the run recorded,
never from defaults restated beside the list."""

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest

from covfeat.core.errors import RunError
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.plan import resolved_config
from covfeat.head.config import FitConfig, SplitConfig
from covfeat.head.runs import run_config
from covfeat.trust.deviations import DEVIATIONS, applying

EVERY_RUN = {"evaluation-view", "resize", "loss"}


def _recorded(fit: FitConfig = FitConfig(), pretrained: bool = True, **extract) -> dict:
    """A run's config.json as head/runs.py writes it, for these settings."""
    spec = SimpleNamespace(identity="none:seed=0", kind="none", pretrained=pretrained, label="none")
    cfg = ExtractConfig(backbone="inception_v3", weights="none", **extract)
    return run_config(fit, SimpleNamespace(config=resolved_config(cfg, spec)), 0.5)


def _keys(c: dict) -> set[str]:
    return {d.key for d in applying(c)}


def test_the_defaults_deviate_where_the_readme_says():
    assert _keys(_recorded()) == EVERY_RUN | {"split", "grouping", "near-duplicates", "smote", "jitter",
                                              "scaled-decode"}


def test_each_recorded_setting_decides_its_deviation():
    fit = FitConfig(split=SplitConfig(val=0.0, by="image", near_duplicates="ignore"), target_recall=None)
    paperlike = _recorded(replace(fit, head=replace(fit.head, balance="none")), augment=0, scaled_decode=False)
    assert _keys(paperlike) == EVERY_RUN
    away = _recorded(FitConfig(target_recall=0.9), pretrained=False, preprocess="backbone")
    assert {"threshold", "weights", "preprocess"} <= _keys(away)


def test_a_lungs_run_says_it_saw_only_the_lungs(tiny_lungs):
    from covfeat.extraction.config import LungsConfig
    from covfeat.lungs.model import LungsModel

    cfg = ExtractConfig(backbone="inception_v3", weights="none", lungs=LungsConfig(model=str(tiny_lungs), outside="crop"))
    spec = SimpleNamespace(identity="none:seed=0", kind="none", pretrained=False, label="none")
    lungs = resolved_config(cfg, spec, {str(tiny_lungs): LungsModel.load(tiny_lungs).hash})
    assert "lungs" in _keys(run_config(FitConfig(), SimpleNamespace(config=lungs), 0.5))
    assert "lungs" not in _keys(_recorded())


# "lungs" reads the whole extract section: a cache made without lungs records none (its key, and so
# every cache made before lungs existed, stays as it was), so its absence means "no lungs".
@pytest.mark.parametrize("d", [d for d in DEVIATIONS if d.reads and d.key != "lungs"], ids=lambda d: d.key)
def test_a_setting_the_run_did_not_record_is_an_error_not_a_default(d):
    c = copy.deepcopy(_recorded())
    where = c
    for k in d.reads[:-1]:
        where = where[k]
    del where[d.reads[-1]]
    with pytest.raises(RunError, match=rf"^A run's config.json has no {'.'.join(d.reads)}, "):
        applying(c)


def test_a_k_fold_run_lists_only_the_deviations_that_apply_to_it():
    """A cross-validation has no 60/10/30 split (each fold's test part is a fold): the split's
    deviation is not its own; the rest are read as for one split."""
    single, k_fold = _recorded(FitConfig()), _recorded(FitConfig(folds=5))
    assert "split" in _keys(single) and _keys(k_fold) == _keys(single) - {"split"}
    del k_fold["folds"]
    with pytest.raises(RunError, match=r"^A run's config.json has no folds, "):
        applying(k_fold)
