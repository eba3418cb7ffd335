"""The model card export writes beside the model, and the one line predict prints from it (issue 16, item 10)."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from covfeat.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(mini_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--out", str(folder / "m.keras"), "--prevalence", "0.2"])
    assert r.exit_code == 0, r.output
    return folder


def test_the_card_holds_what_a_deployer_needs(mini_run, exported):
    from covfeat.head.runs import Run
    from covfeat.head.split import TEST, TRAIN
    from covfeat.store.reader import open_cache
    from covfeat.trust.deviations import DEVIATIONS

    card = json.loads((exported / "model_card.json").read_text())
    md = (exported / "model_card.md").read_text()
    run = Run(mini_run)
    fc = open_cache(run.cache_info["path"])
    split, man = run.split(), fc.manifest
    # training sources with images and patients per class, counted here by hand
    for src, parts in card["training_data"]["sources"].items():
        for part, k in (("train", TRAIN), ("test", TEST)):
            for lab, name in ((1, "COVID-19"), (0, "NORMAL")):
                rows = np.flatnonzero((split == k) & (man["source"] == src) & (man["label"] == lab))
                assert parts[part][name] == {"images": len(rows), "patients": len(set(man["patient_id"][rows]))}
    assert sorted(card["training_data"]["sources"]) == sorted(set(man["source"]))
    assert ("every COVID-19 image comes from cohen and every NORMAL one from kermany, and no source holds both "
            "classes") in md  # the sentence of the report's banner and the source probe
    # per-source test results, with patient-level intervals and their counts
    pred = run.predictions()
    cohen = card["test_results"]["by_source"]["cohen"]["covid_recall"]
    covid = (pred["source"] == "cohen") & (pred["label"] == 1)
    assert cohen["estimate"] == pytest.approx(float((pred["p_covid"][covid] >= run.threshold).mean()))
    assert cohen["images"][0] == int(covid.sum())
    assert card["test_results"]["overall"]["roc_auc"]["estimate"] == pytest.approx(run.metrics["argmax"]["roc_auc"])
    # calibration, threshold and the prevalence it assumes
    assert set(card["calibration"]["raw"]) == {"brier", "ece"}
    brier = np.mean((pred["p_covid"] - pred["label"]) ** 2)
    assert card["calibration"]["raw"]["brier"]["estimate"] == pytest.approx(brier)
    t = card["threshold"]
    assert t["raw"] == run.threshold and t["prevalence"] == 0.2 and card["prevalence"]["target_from"] == "--prevalence"
    assert "chosen" not in t["rule"] and t["rule"].startswith("argmax")
    # the audit, the deviations, NOT PRETRAINED, the intended use and the checklists
    assert card["audit"] == "not audited" and "- not audited:" in md
    weights = next(d.text for d in DEVIATIONS if d.key == "weights")
    assert weights in card["deviations_from_paper"]
    assert card["warning"] == ("WARNING: research use only, not a diagnostic device; this model is NOT PRETRAINED "
                               "(random-init backbone). See its model card.")
    assert f"**{card['warning']}**" in md and "NOT PRETRAINED: features from a random-init backbone" in md
    assert any("Not a medical device" in u for u in card["intended_use"])
    assert {("TRIPOD+AI", "13"), ("TRIPOD+AI", "23a")} <= {(c["checklist"], c["item"]) for c in card["checklists"]}


def _flagged_copy(run, tmp_path, pretrained: bool, audit: dict | None):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    m = json.loads((copy / "metrics.json").read_text())
    m["pretrained"] = pretrained
    (copy / "metrics.json").write_text(json.dumps(m))
    if audit is not None:
        (copy / "audit.json").write_text(json.dumps(audit))
    return copy


AUDIT = {"pretrained": False, "metadata": {"status": "FLAGGED", "verdict": "file metadata alone separates the classes."},
         "control": {"status": "CLEAR", "verdict": "within the margin."}}


def test_predict_prints_the_cards_line_when_the_audit_flagged_the_run(mini, mini_run, tmp_path):
    from covfeat.head.runs import Run
    from covfeat.use.card import model_card, warning
    from covfeat.use.prevalence import prior_correction

    run = _flagged_copy(mini_run, tmp_path, True, AUDIT)
    line = ("WARNING: research use only, not a diagnostic device; its audit flagged the metadata probe. See its model "
            "card.")
    assert warning(Run(run)) == line
    r = runner.invoke(app, ["predict", "--run", str(run), str(mini["normal"])])
    assert r.exit_code == 0, r.output
    assert line in r.stderr.splitlines()
    card = model_card(Run(run), prior_correction(run))
    assert card["audit"]["metadata"]["status"] == "FLAGGED" and card["audit"]["control"]["status"] == "CLEAR"


def test_a_pretrained_run_that_no_probe_flagged_gets_no_warning(mini, mini_run, tmp_path):
    from covfeat.head.runs import Run
    from covfeat.use.card import warning

    run = _flagged_copy(mini_run, tmp_path, True, {**AUDIT, "metadata": {"status": "CLEAR", "verdict": "."}})
    assert warning(Run(run)) is None


def test_patients_are_counted_apart_from_images():
    """Two radiographs of one patient are two images and one patient, in every split and source."""
    from types import SimpleNamespace

    from covfeat.use.card import training_data

    man = {"source": np.array(["cohen", "cohen", "cohen", "kermany", "kermany"]),
           "label": np.array([1, 1, 1, 0, 0]), "patient_id": np.array(["7", "7", "8", "a", "b"])}
    fc = SimpleNamespace(manifest=man, has_features=lambda: np.ones(5, bool))
    run = SimpleNamespace(split=lambda: np.array([0, 0, 2, 0, 2]), config={"split": {}})
    got = training_data(run, fc)
    assert got["sources"]["cohen"]["train"]["COVID-19"] == {"images": 2, "patients": 1}
    assert got["sources"]["cohen"]["test"]["COVID-19"] == {"images": 1, "patients": 1}
    assert got["sources"]["kermany"]["train"]["NORMAL"] == {"images": 1, "patients": 1}
    assert got["confounding"] == ["every COVID-19 image comes from cohen and every NORMAL one from kermany, and no "
                                  "source holds both classes"]
