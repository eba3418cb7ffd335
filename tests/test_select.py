"""Selection on validation only, and backbone vs backbone as paired differences (issue 16, item 7)."""

import json
import shutil
from itertools import combinations

import numpy as np
import pytest

from covfeat.core.errors import ConfigError, DataError


def _copy(run, folder, test_auc):
    """A copy of ``run`` whose recorded test ROC AUC is ``test_auc``."""
    shutil.copytree(run, folder)
    m = json.loads((folder / "metrics.json").read_text())
    m["argmax"]["roc_auc"] = test_auc
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_select_picks_by_validation_not_by_test(mini_run, tmp_path, monkeypatch):
    """Run a is better on validation and worse on test than run b: select() must pick a."""
    import covfeat
    import covfeat.use.select as sel

    a, b = _copy(mini_run, tmp_path / "a", 0.1), _copy(mini_run, tmp_path / "b", 0.9)
    y = np.array([1, 1, 1, 0, 0, 0])
    groups = np.array(["1", "2", "3", "4", "5", "6"])
    val = {a: np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]),  # validation AUC 1
           b: np.array([0.9, 0.2, 0.1, 0.8, 0.7, 0.3])}  # validation AUC 1/3
    monkeypatch.setattr(sel, "validation_scores", lambda run: (y, val[run.path], groups))
    assert covfeat.select([b, a]) == a and covfeat.select([a, b]) == a
    ranked = sel.ranking([b, a])
    assert [p for p, _ in ranked] == [a, b]
    assert ranked[0][1].estimate == pytest.approx(1.0) and ranked[1][1].estimate == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match=r"^on: expected one of validation, cv, got 'test'; a run chosen by its test "
                                          r"rows reports an optimistic test score\.$"):
        covfeat.select([a, b], on="test")


def test_validation_scores_are_the_runs_own_validation_rows(mini_run):
    """The head on the cached validation maps: the rows fit-head's last epoch scored."""
    from covfeat.head.runs import Run
    from covfeat.head.split import VAL
    from covfeat.store.reader import open_cache
    from covfeat.use.select import validation_scores

    run = Run(mini_run)
    y, p, groups = validation_scores(run)
    man = open_cache(run.cache_info["path"]).manifest
    val = run.split() == VAL
    assert sorted(groups) == sorted(man["patient_id"][val]) and sorted(y) == sorted(man["label"][val])
    assert np.mean((p >= 0.5) == y) == pytest.approx(run.history()[-1]["val_accuracy"])


def test_a_run_without_validation_images_of_both_classes_cannot_be_selected(mini_cache, tmp_path):
    from conftest import fit

    from covfeat.head.fit import fit_head
    from covfeat.use.select import select

    run = fit_head(mini_cache, fit(1, split={"val": 0.0}), tmp_path / "runs", progress=False)
    with pytest.raises(DataError, match=r"has 0 COVID-19 and 0 NORMAL validation images; selection needs both"):
        select([run])


@pytest.fixture(scope="module")
def seeds(mini_cache, mini_run, tmp_path_factory):
    """Three heads on the same split (other head seeds, same split seed): the same test rows."""
    from conftest import fit

    from covfeat.head.fit import fit_head

    out = tmp_path_factory.mktemp("seeds")
    return {"s0": mini_run, **{f"s{k}": fit_head(mini_cache, fit(5, seed=k), out, progress=False) for k in (1, 2)}}


def test_backbone_vs_backbone_is_the_paired_difference_on_the_same_rows(seeds):
    from sklearn.metrics import roc_auc_score

    from covfeat.head.runs import Run
    from covfeat.use.select import paired_differences

    rows = paired_differences(seeds)
    assert [(r["a"], r["b"]) for r in rows] == list(combinations(seeds, 2))
    pred = {n: Run(r).predictions() for n, r in seeds.items()}
    for r in rows:
        want = roc_auc_score(pred[r["a"]]["label"], pred[r["a"]]["p_covid"]) - \
            roc_auc_score(pred[r["b"]]["label"], pred[r["b"]]["p_covid"])
        assert r["difference"] == pytest.approx(want)
        assert r["method"] == "paired MOVER"
    p = np.array([r["p_value"] for r in rows])
    order = np.argsort(p)
    holm = np.minimum(np.maximum.accumulate(p[order] * np.array([3, 2, 1])), 1)  # Holm, written out
    np.testing.assert_allclose([rows[i]["holm_p"] for i in order], holm)


def test_holm_adjusts_across_every_pair(seeds, monkeypatch):
    """Holm's step-down across the pairs, by hand: p = 0.01, 0.04, 0.03 -> 0.03, 0.06, 0.06."""
    import covfeat.use.select as sel
    from covfeat.trust.intervals import Difference

    ps = iter([0.01, 0.04, 0.03])
    monkeypatch.setattr(sel, "paired_difference", lambda *a, **k: Difference(
        "roc_auc", 0.1, 0.0, 0.2, 0.95, "paired MOVER", (2, 2), (2, 2), next(ps), True))
    rows = sel.paired_differences(seeds)
    assert [r["holm_p"] for r in rows] == pytest.approx([0.03, 0.06, 0.06])


def test_runs_tested_on_other_rows_are_not_paired(mini_cache, mini_run, tmp_path):
    from conftest import fit

    from covfeat.head.fit import fit_head
    from covfeat.use.select import paired_differences

    other = fit_head(mini_cache, fit(1, split={"seed": 3}), tmp_path / "runs", progress=False)
    with pytest.raises(DataError, match=r"were tested on different images; a paired comparison needs the same"):
        paired_differences({"a": mini_run, "b": other})


def test_reproduce_names_the_choice_and_its_test_numbers(seeds):
    from covfeat.use.reproduce import selection
    from covfeat.use.select import select

    text = selection(seeds)
    best = {v: k for k, v in seeds.items()}[select(list(seeds.values()))]
    assert "Backbones ranked by roc_auc on their validation images (test rows are not used to choose):" in text
    assert f"Chosen: {best}; its test numbers: COVID-19 recall " in text
    assert "s0 - s1: " in text and "Holm p" in text


def test_cross_validated_runs_are_ranked_by_their_mean(mini_cache, mini_run, tmp_path):
    from conftest import fit

    from covfeat.head.fit import fit_head
    from covfeat.head.runs import Run
    from covfeat.use.reproduce import selection
    from covfeat.use.select import score

    cv = fit_head(mini_cache, fit(2, folds=2), tmp_path / "runs", progress=False)
    iv = score(cv, on="cv")
    assert iv.estimate == Run(cv).metrics["cv"]["roc_auc"]["mean"]
    text = selection({"a": cv})
    assert "ranked by roc_auc on their cross-validated mean" in text and "no paired test between backbones" in text
    with pytest.raises(ConfigError, match=r"is a single-split run; select it on 'validation'\.$"):
        score(mini_run, on="cv")
