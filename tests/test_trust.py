"""Numbers a reviewer cannot knock down: intervals checked by hand, per-source counts, the
audit's intervals, the deviations list and the one-page report."""

import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.probes.common import auc_interval
from covfeat.trust.metrics import by_source, cv_interval, wilson

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


def test_cv_interval_against_a_hand_computation():
    scores = [0.80, 0.90, 0.85, 0.95, 0.70]
    got = cv_interval(scores, test_over_train=0.25, folds=5)
    mean = 0.84
    s2 = sum((x - mean) ** 2 for x in scores) / 4  # 0.009250
    half = 2.7764451 * math.sqrt((1 / 5 + 0.25) * s2)  # t(0.975, 4) = 2.7764451
    assert got["mean"] == pytest.approx(mean)
    assert (got["lo"], got["hi"]) == pytest.approx((mean - half, mean + half), abs=1e-6)
    assert (got["n"], got["undefined"]) == (5, 0)


def test_repeats_never_give_a_narrower_interval_than_one_repeat_justifies():
    rng = np.random.default_rng(0)
    one = rng.normal(0.8, 0.05, 5)
    naive_half = 2.7764451 * one.std(ddof=1) / math.sqrt(5)  # the old t interval over 5 folds
    for repeats in (1, 3, 10, 100):
        scores = rng.normal(0.8, 0.05, 5 * repeats)
        c = cv_interval(scores, test_over_train=0.25, folds=5)
        half = (c["hi"] - c["lo"]) / 2
        assert half >= 2.7764451 * math.sqrt(0.25) * scores.std(ddof=1) * 0.999  # the floor without any 1/J term
        if repeats >= 10:
            assert half > naive_half * 0.9  # the naive interval shrank with sqrt(repeats); this one does not


def test_undefined_folds_are_counted_not_dropped():
    c = cv_interval([0.5, float("nan"), 0.7, None], test_over_train=0.5, folds=4)
    assert (c["n"], c["undefined"]) == (2, 2) and c["mean"] == pytest.approx(0.6)


def test_by_source_counts_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.7, 0.1, 0.8, 0.9, 0.3, 0.6])
    src = np.array(["cohen", "cohen", "cohen", "kermany", "kermany", "openist", "openist", "openist"])
    got = by_source(y, p, src)
    assert got["cohen"]["covid_recall"] == [2 / 3, *wilson(2, 3), 2, 3] and "specificity" not in got["cohen"]
    assert got["kermany"]["specificity"][3:] == [1, 2]
    assert got["openist"]["specificity"][3:] == [1, 3]
    assert by_source(y, p, src, threshold=0.95)["openist"]["specificity"][3:] == [3, 3]


def test_bootstrap_resamples_patients_not_images():
    """Ten copies per patient: resampling images pretends to 10x the evidence."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.r_[np.ones(8), np.zeros(8)], 10).astype(int)
    p = np.repeat(rng.uniform(0, 1, 16) + 0.3 * np.r_[np.ones(8), np.zeros(8)], 10)
    groups = np.repeat(np.arange(16), 10)
    by_patient = auc_interval(y, p, groups)
    by_image = auc_interval(y, p, np.arange(len(y)))
    assert by_patient.hi - by_patient.lo > 2 * (by_image.hi - by_image.lo)
    assert by_patient.n_groups == (8, 8) and by_patient.n_images == (80, 80)


def test_readme_lists_every_deviation():
    from covfeat.trust.deviations import DEVIATIONS

    text = " ".join(README.read_text().split())
    section = text[text.index("## How covfeat differs from the paper"):text.index("## What covfeat decides")]
    for d in DEVIATIONS:
        assert " ".join(d.text.split()) in section, d.key


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.text, self.h2 = [], [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("href", "src"):
            assert not (a.get(k) or "").startswith(("http", "//", "file:")), a  # self-contained
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data.strip())


def test_report_html_is_one_self_contained_page(mini_run, tmp_path):
    r = runner.invoke(app, ["report", str(mini_run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "report.html").read_text()
    page = _Page()
    page.feed(html)
    assert page.h2[:5] == ["Table 2, measured beside the paper", "Per source (test images)", "Audit",
                           "How these runs differ from the paper", "Figures"]
    assert len(page.imgs) == 2 and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    text = " ".join(" ".join(page.text).split())
    assert "NOT PRETRAINED" in text and "NORMAL specificity" in text and "kermany" in text
    assert "Not audited yet" in text
    assert "Split: 60% train, 10% validation, 30% test by default" in text  # a deviation that applies
    assert "the threshold was chosen on validation rows" not in text  # one that does not


@pytest.mark.slow
def test_report_html_renders_in_chromium(mini_run, tmp_path):
    """As a person sees it: headless Chromium renders the page to a screenshot with content."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt install chromium)")
    runner.invoke(app, ["report", str(mini_run), "--out", str(tmp_path / "rep")])
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,2400",
                    (tmp_path / "rep" / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    import cv2

    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (2400, 1200)
    assert (img < 128).mean() > 0.01  # text and figures, not a blank page


def test_report_html_shows_grad_cam_overlays_that_explain_made(mini, mini_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(mini_run, run)
    imgs = sorted((mini["cohen"] / "images").iterdir())[:2]
    r = runner.invoke(app, ["explain", "--run", str(run), *map(str, imgs)])
    assert r.exit_code == 0, r.output
    assert len(list((run / "gradcam").glob("*_gradcam.png"))) == 2  # the default folder is the run's own
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    page = _Page()
    page.feed((run / "report.html").read_text())
    assert "Grad-CAM" in page.h2 and len(page.imgs) == 4  # two figures, two overlays
