"""The audit's lungs probes (issue 17) on synthetic sets whose answer is known: the class written
only outside the lungs, or only inside them (tests/synthetic_lungs.py), segmented by the tiny
lungs model of tests/conftest.py."""

import json

import pytest
from conftest import fit
from synthetic_lungs import write_set
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.run import extract
from covfeat.head.fit import fit_head
from covfeat.probes.audit import audit

runner = CliRunner()
# half the patients in test, so that the verdicts rest on enough of them to be reached (not INCONCLUSIVE)
FAST_HEAD = fit(25, split={"val": 0.15, "test": 0.5}, learning_rate=0.02, momentum=0.9)
N_PER_CLASS = 44


def _run(root, where):
    data = write_set(root / where, N_PER_CLASS, where=where, seed=1)
    cache = extract([data["covid"].parent], ExtractConfig(backbone="inception_v3", weights="none", augment=0),
                    root / "cache", progress=False)
    return fit_head(cache, FAST_HEAD, root / "runs", progress=False)


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A run whose class lies only outside the lungs (a bright corner square)."""
    root = tmp_path_factory.mktemp("outside")
    return root, _run(root, "outside")


@pytest.fixture(scope="module")
def inside(tmp_path_factory):
    """A run whose class lies only inside the lungs (bright opacities)."""
    root = tmp_path_factory.mktemp("inside")
    return root, _run(root, "inside")


def above_chance(res) -> bool:
    """The retrained head's AUC beyond the margin above chance (``verdict3``: every occlusion
    result keeps that reading, whatever its probe's status makes of it)."""
    return res["verdict3"] == "FLAGGED" and res["roc_auc"][0] > 0.5


def _coverage(res, lungs, other):
    cov = res["coverage"]
    assert (cov["lungs"]["mean"], cov["lungs"]["min"], cov["lungs"]["max"]) == (lungs,) * 3, cov
    assert (cov["other"]["mean"], cov["other"]["min"], cov["other"]["max"]) == (other,) * 3, cov


@pytest.mark.slow  # 25 s, a whole audit with three probes; the default suite keeps each branch of the lungs probes' reading, the one-line error and extraction with lungs
def test_the_class_outside_the_lungs(outside, tiny_lungs):
    root, run = outside
    r = runner.invoke(app, ["audit", "--run", str(run), "--lungs", str(tiny_lungs), "--cache-dir",
                            str(root / "cache")])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "audit.json").read_text())
    blanked, only, box = res["lungs_blanked"], res["lungs_only"], res["occlusion"]
    # the lungs alone carry nothing of the class; what lies outside them still separates it
    assert not above_chance(only), only["verdict"]
    assert above_chance(blanked), blanked["verdict"]
    assert blanked["verdict"].startswith("FLAGGED: with the lung fields (as the lungs model in ")
    assert "so it reads something outside the lungs" in blanked["verdict"]
    assert only["verdict"].startswith("FLAGGED: with everything outside the lungs blanked"), only["verdict"]
    assert "what the run reads lies outside the lungs" in only["verdict"]
    # each probe states what its blanking covered, from segmenting the run's test images
    _coverage(blanked, 1.0, 0.0)
    _coverage(only, 0.0, 1.0)
    cov = box["coverage"]
    assert 0.5 < cov["lungs"]["mean"] <= 1 and 0 < cov["other"]["mean"] < 1 and cov["n_images"] == box["n_test"]
    assert "The blanking covered " in box["verdict"] and "of the lung pixels (range " in box["verdict"]
    assert box["verdict"].startswith("FLAGGED: with the central box (0.15, 0.1, 0.85, 0.9) blanked")
    # every paired comparison is one of Holm's family (a random-init run is its own control: no pair there)
    assert "paired" not in res["control"]
    for name in ("occlusion", "lungs_blanked", "lungs_only"):
        assert res[name]["paired"]["family_members"] == ["occlusion", "lungs_blanked", "lungs_only"], name
    for line in ("lungs_blanked probe: FLAGGED", "lungs_only probe: FLAGGED", "occlusion probe: FLAGGED"):
        assert line in r.stdout


@pytest.mark.slow  # 21 s; the default suite keeps the class outside the lungs and each branch of the reading
def test_the_class_inside_the_lungs(inside, tiny_lungs):
    root, run = inside
    res = audit(run, cache_dir=root / "cache", probes=("occlusion",), progress=False, lungs=tiny_lungs)
    blanked, only = res["lungs_blanked"], res["lungs_only"]
    assert above_chance(only), only["verdict"]
    # the lungs alone separate the classes: the lungs-only probe raises no doubt (FLAGGED means doubt)
    assert only["status"] in ("CLEAR", "INCONCLUSIVE"), only["verdict"]
    assert "the lungs alone separate the classes" in only["verdict"].lower(), only["verdict"]
    assert not above_chance(blanked), blanked["verdict"]
    assert list(res) == ["pretrained", "weights", "occlusion", "lungs_blanked", "lungs_only", "gradcam"]


@pytest.mark.slow  # 11 s, a second audit of the same run; the default suite keeps the audit with lungs and its verdicts
def test_the_box_probe_is_the_same_with_or_without_lungs(outside, tiny_lungs):
    """The box probe's numbers do not move when the lungs probes join it (only Holm's family
    grows), and without --lungs its words stay about a box."""
    root, run = outside
    plain = audit(run, cache_dir=root / "cache", probes=("occlusion",), progress=False)
    with_lungs = audit(run, cache_dir=root / "cache", probes=("occlusion",), progress=False, lungs=tiny_lungs)
    a, b = plain["occlusion"], with_lungs["occlusion"]
    for k in ("roc_auc", "roc_auc_run", "interval", "n_compared", "accuracy"):
        assert a[k] == b[k], k
    for k in ("difference", "interval", "p_beyond_margin"):
        assert a["paired"][k] == b["paired"][k], k
    assert list(plain) == ["pretrained", "weights", "occlusion"] and "coverage" not in a
    assert "lung" not in a["verdict"].lower() and a["paired"]["family"] == 1


def test_a_lungs_folder_that_is_not_one_is_one_line(outside, tmp_path):
    root, run = outside
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["audit", "--run", str(run), "--lungs", str(tmp_path / "empty")])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "not a lungs model" in r.stderr


def _only(chance: str, auc: float, diff: float, lo: float, hi: float, paired3: str, p_holm: float) -> dict:
    """A lungs_only result as occlusion_probe leaves it: the lungs-only AUC read against chance
    (``verdict3``) and the paired difference, run minus lungs only."""
    from covfeat.probes.lungs import lungs_only_finish

    pd = {"difference": diff, "interval": [lo, hi], "margin": 0.05, "verdict3": paired3, "p_holm": p_holm,
          "family": 3, "needed_patients": [40, 40], "needed_for": "to show it"}
    return lungs_only_finish({"margin": 0.05, "paired": pd, "verdict3": chance, "roc_auc": [auc, auc - 0.1, auc + 0.1],
                              "auc_texts": {"occluded": f"ROC AUC {auc}", "run": "ROC AUC 0.9"}})


@pytest.mark.parametrize("args, status, words", [
    (("CLEAR", 0.51, 0.01, -0.03, 0.04, "CLEAR", 1.0), "FLAGGED", "The lungs alone are within the margin of chance"),
    (("FLAGGED", 0.70, 0.20, 0.10, 0.30, "FLAGGED", 0.001), "FLAGGED", "scores beyond the margin above the lungs alone"),
    (("FLAGGED", 0.88, 0.01, -0.02, 0.04, "CLEAR", 1.0), "CLEAR", "as well as the whole image within the margin"),
    (("FLAGGED", 0.80, 0.08, 0.01, 0.15, "FLAGGED", 0.2), "INCONCLUSIVE", "whether the whole image adds more"),
    (("INCONCLUSIVE", 0.60, 0.02, -0.1, 0.2, "INCONCLUSIVE", 1.0), "INCONCLUSIVE",
     "whether the lungs alone separate the classes cannot be told"),
])
def test_lungs_only_reads_flagged_as_doubt(args, status, words):
    """Each branch of the lungs-only reading, without extracting anything: the lungs alone at
    chance, or the whole image shown ahead of them, is doubt (FLAGGED); the lungs alone beyond
    chance and within the margin of the run is CLEAR; the rest cannot be told."""
    res = _only(*args)
    assert res["status"] == status and words in res["verdict"], res["verdict"]
    assert res["verdict3"] == args[0]  # the reading against chance is kept as every occlusion result keeps it
