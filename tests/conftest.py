"""Shared fixtures: small real-radiograph data sets built from the bundled sample, and caches."""

import csv
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["COVFEAT_NO_PROGRESS"] = "1"

SAMPLE = Path(__file__).resolve().parents[1] / "covfeat" / "data" / "sample"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-cxr"


@pytest.fixture(scope="session", autouse=True)
def graph_cache(tmp_path_factory):
    """covfeat's backbone graphs (covfeat.extraction.graphfile), shared by the session's tests and their
    session fixtures (set before any of them extracts); never the user's own cache."""
    folder = tmp_path_factory.mktemp("backbone_graphs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVFEAT_GRAPH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def head_cache(tmp_path_factory):
    """covfeat's head templates (covfeat.head.template), shared by the session's tests."""
    return tmp_path_factory.mktemp("head_templates")


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch, head_cache):
    """Every cache and run folder under tmp_path; Keras's cache and covfeat's head templates
    too; no progress bars."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COVFEAT_HEAD_CACHE", str(head_cache))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))  # for subprocesses
    from keras.src.backend import config as keras_config  # Keras reads KERAS_HOME once, at import

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras_home"))
    monkeypatch.setenv("COVFEAT_NO_PROGRESS", "1")


@pytest.fixture
def seed():
    return 0


def make_mini(root: Path, n_covid: int = 8, n_normal: int = 8) -> dict:
    """A Cohen folder (with one missing file and one non-COVID row) and a Kermany NORMAL folder."""
    cohen = root / "cohen"
    (cohen / "images").mkdir(parents=True)
    rows = list(csv.DictReader(open(SAMPLE / "cohen" / "metadata.csv")))[:n_covid]
    for r in rows:
        shutil.copy(SAMPLE / "cohen" / "images" / r["filename"], cohen / "images" / r["filename"])
    missing = dict(rows[0], filename="not-on-disk.jpg", patientid="999")
    other = dict(rows[1], filename=rows[1]["filename"], finding="Pneumonia/Viral/SARS", patientid="998")
    with open(cohen / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + [missing, other])
    normal = root / "kermany" / "NORMAL"
    normal.mkdir(parents=True)
    for p in sorted((SAMPLE / "kermany" / "NORMAL").iterdir())[:n_normal]:
        shutil.copy(p, normal / p.name)
    return {"cohen": cohen, "normal": normal, "n_covid": n_covid, "n_normal": n_normal}


@pytest.fixture(scope="session")
def mini(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="session")
def mini_cache(tmp_path_factory, mini):
    """inception_v3, random init, 2 jittered views: the cache most stage-two tests use."""
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.run import extract

    out = tmp_path_factory.mktemp("cache")
    cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=2)
    return extract([mini["cohen"], mini["normal"]], cfg, out, progress=False)


MINI_SPLIT = {"val": 0.2, "test": 0.3}


def fit(epochs: int = 5, target_recall=None, folds: int = 0, split: dict | None = None, **head):
    """A FitConfig on the mini split (val 0.2, test 0.3) with the given head settings."""
    from covfeat.head.config import FitConfig, HeadConfig, SplitConfig

    return FitConfig(head=HeadConfig(epochs=epochs, **head), split=SplitConfig(**{**MINI_SPLIT, **(split or {})}),
                     target_recall=target_recall, folds=folds)


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory, mini_cache):
    from covfeat.head.fit import fit_head

    return fit_head(mini_cache, fit(5), tmp_path_factory.mktemp("runs"), progress=False)


TINY_LUNGS = {"size": 64, "filters": 8, "depth": 2, "epochs": 12, "patience": 12, "batch_size": 2,
              "learning_rate": 2e-3}


@pytest.fixture(scope="session")
def tiny_lungs(tmp_path_factory):
    """A lungs folder trained in seconds: 24 synthetic radiographs (tests/synthetic_lungs.py,
    no class signal) at 64 px, a two-level U-Net.  Its held-out Dice is checked in
    tests/test_lungs.py; lungs.json names the images it was trained on."""
    from synthetic_lungs import write_set

    from covfeat.lungs.config import LungsFitConfig
    from covfeat.lungs.fit import fit_lungs

    root = tmp_path_factory.mktemp("tiny_lungs")
    d = write_set(root / "data", n_per_class=12, seed=0, size=64)
    for p in d["covid"].iterdir():  # one images folder: the segmenter does not care about classes
        shutil.move(p, d["normal"] / p.name)
    return fit_lungs(d["normal"], d["masks"], root / "lungs", LungsFitConfig(**TINY_LUNGS)).folder


def pytest_collection_modifyitems(config, items):
    if not SHARED.is_dir():
        skip = pytest.mark.skip(reason=f"{SHARED} is not present")
        for it in items:
            if "slow" in it.keywords:
                it.add_marker(skip)
