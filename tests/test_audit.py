"""Cross-validation, the operating point, reproduction, the shortcut probes on synthetic
images whose answer is known, and Grad-CAM heat maps."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import fit
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.run import extract
from covfeat.head.fit import fit_head
from covfeat.probes.audit import audit
from covfeat.probes.source import source_probe
from covfeat.store.reader import open_cache
from covfeat.trust.metrics import cv_interval, threshold_for_recall

runner = CliRunner()
FAST_HEAD = fit(25, learning_rate=0.02, momentum=0.9)


def synthetic(root: Path, kind: str, n: int = 30, seed: int = 0, compression: dict | None = None) -> list[Path]:
    """Noise radiographs. kind='corner': COVID-19 has a white square in the top-left corner,
    outside the lung box; 'clean': COVID-19 has a bright disc in the middle, inside it.
    Returns a manifest CSV with two sources per class (siteB's NORMAL marked in the corner
    when kind='site-marker').  ``compression`` (label -> PNG level 0-9) changes only how the
    files are written, not a pixel."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in ("COVID-19", "NORMAL"):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.normal(100, 25, (256, 256)).clip(0, 255)).astype(np.uint8)
            site = "siteA" if i % 2 else "siteB"
            if label == "COVID-19" and kind == "corner":
                img[4:34, 4:34] = 255
            if label == "COVID-19" and kind == "clean":
                cv2.circle(img, (128, 128), 45, 230, -1)
            if kind == "site-marker" and site == "siteB":
                img[4:34, 4:34] = 255
            p = d / f"{label[:1]}{i:03d}.png"
            cv2.imwrite(str(p), img, [cv2.IMWRITE_PNG_COMPRESSION, (compression or {}).get(label, 3)])
            rows.append([str(p), label, f"{label[:1]}{i}", site])
    man = root / "manifest.csv"
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "source"])
        w.writerows(rows)
    return [man]


def _run(tmp_path, kind, **kw):
    src = synthetic(tmp_path / kind, kind, **kw)
    cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=0)
    cache = extract(src, cfg, tmp_path / "cache", progress=False)
    return fit_head(cache, FAST_HEAD, tmp_path / "runs", progress=False)


def test_occlusion_probe_catches_a_corner_marker(tmp_path):
    run = _run(tmp_path, "corner")
    res = audit(run, cache_dir=tmp_path / "cache", progress=False)
    occ = res["occlusion"]
    assert occ["status"] == "FLAGGED" and occ["interval"][0] > 0.55, occ
    assert occ["verdict"].startswith("FLAGGED: with the central box (0.15, 0.1, 0.85, 0.9) blanked, the same head "
                                     "retrained on the same split gives ROC AUC ")
    assert "against the run's own ROC AUC" in occ["verdict"] and "reads something outside the blanked box" in occ["verdict"]
    assert "lung" not in occ["verdict"].lower() and occ["n_compared"] == occ["n_test"]
    ctl = res["control"]
    assert ctl["own_control"] and ctl["status"] == "FLAGGED", ctl
    assert ctl["verdict"].startswith("FLAGGED: this run's backbone is itself random-init (NOT PRETRAINED), so it is "
                                     "its own control: it reaches ROC AUC ")
    assert (run / "audit.json").is_file()
    r = runner.invoke(app, ["report", str(run)])
    assert "audit: occlusion probe" in r.stdout and "FLAGGED" in r.stdout


def test_occlusion_probe_does_not_flag_a_clean_task(tmp_path):
    run = _run(tmp_path, "clean")
    m = json.loads((run / "metrics.json").read_text())["argmax"]
    assert m["roc_auc"] > 0.9  # the task itself is learnable from the lungs
    occ = audit(run, cache_dir=tmp_path / "cache", probes=("occlusion",), progress=False)["occlusion"]
    assert occ["status"] in ("CLEAR", "INCONCLUSIVE"), occ
    # 9 test patients per class cannot show the blanked image at chance within 0.05: an interval that
    # reaches 0.5 is no evidence of no signal, so the verdict says how many patients would tell
    assert occ["status"] == "INCONCLUSIVE" and occ["interval"][0] < 0.5 < occ["interval"][1], occ["verdict"]
    assert "NORMAL patients would be needed to show" in occ["verdict"] and "inside the blanked" not in occ["verdict"]
    # the run's own AUC and the paired drop come from the same rows as the occluded AUC
    assert occ["paired"]["difference"] == pytest.approx(occ["roc_auc_run"][0] - occ["roc_auc"][0])
    assert occ["paired"]["interval"][0] > 0.05 and "blanking costs more than the margin" in occ["verdict"]


def test_a_shortcut_inside_the_lung_box_is_seen_by_the_metadata_probe(tmp_path):
    """COVID-19 files are written with another PNG compression (not one pixel differs) and
    carry their evidence inside the lung box: occlusion cannot see the file-level shortcut,
    the metadata probe does, with its number."""
    run = _run(tmp_path, "clean", compression={"COVID-19": 9, "NORMAL": 0})
    res = audit(run, cache_dir=tmp_path / "cache", probes=("metadata", "occlusion", "control"), progress=False)
    assert res["occlusion"]["status"] != "FLAGGED", res["occlusion"]
    md = res["metadata"]
    assert md["status"] == "FLAGGED" and md["interval"][0] > 0.5 + md["margin"], md
    assert md["verdict"].startswith("FLAGGED: file metadata alone (sizes, aspect, channels, bit depth, format, bytes "
                                    "per pixel; no pixels), in a patient-grouped 5-fold CV of a logistic regression, "
                                    "gives ROC AUC ")
    assert "its own control" in res["control"]["verdict"]


def test_source_probe_within_a_class(tmp_path):
    for kind, want in (("site-marker", "FLAGGED"), ("plain", ("CLEAR", "INCONCLUSIVE"))):
        src = synthetic(tmp_path / kind, kind)
        cache = extract(src, ExtractConfig(backbone="inception_v3", weights="none", augment=0), tmp_path / "c",
                        progress=False)
        res = source_probe(open_cache(cache))
        assert res["status"] in (want if isinstance(want, tuple) else (want,)), (kind, res)
        assert set(res["by_class"]) == {"COVID-19", "NORMAL"}
        assert res["balance"].startswith("every source holds images of both classes (COVID-19 images per source: "
                                         "siteA 15/30, siteB 15/30)") and not res["confounded"]


def test_source_probe_says_confounded_on_the_real_layout(mini_cache):
    res = source_probe(open_cache(mini_cache))
    assert res["status"] == "FLAGGED" and res["confounded"]
    assert res["verdict"].startswith("FLAGGED: every COVID-19 image comes from cohen and every NORMAL one from kermany, "
                                     "and no source holds both classes: any classifier of these classes is also a "
                                     "classifier of their source. No class has two sources")


def test_external_validation_reports_the_drop(tmp_path):
    run = _run(tmp_path, "corner")
    other = synthetic(tmp_path / "ext", "plain", n=12, seed=5)  # no marker: the shortcut is gone
    res = audit(run, external=other, cache_dir=tmp_path / "cache", probes=(), progress=False)["external"]
    ext = res["at"]["argmax"]["external"]
    assert ext["n_covid"] == 12 and ext["n_normal"] == 12 and res["overlap"] == []
    assert res["roc_auc_internal"][0] - res["roc_auc_external"][0] > 0.3 and res["status"] == "FLAGGED", res["verdict"]
    assert "ROC AUC" in res["verdict"] and "Both sides are scored at the same threshold(s): argmax 0.500." in res["verdict"]
    assert set(res["at"]["argmax"]["external_by_source"]) == {"siteA", "siteB"}
    # like with like, per source, never accuracy; the flag rests on a difference's interval beyond the margin
    assert {(c["metric"], c["where"].split(" ")[0]) for c in res["comparisons"]} == {
        ("roc_auc", "the"), ("covid_recall", "siteA"), ("covid_recall", "siteB"), ("specificity", "siteA"),
        ("specificity", "siteB")}
    auc = res["comparisons"][0]
    assert auc["metric"] == "roc_auc" and auc["interval"][1] < -0.05, auc
    assert "ROC AUC, the whole external set: " in res["verdict"].split("; external ROC AUC")[0]


def test_external_copies_of_training_images_are_listed_and_left_out(tmp_path):
    run = _run(tmp_path, "corner")
    from covfeat.head.runs import Run

    train = [p for p, s in zip(open_cache(Run(run).cache_info["path"]).manifest["path"], Run(run).split()) if s == 0]
    ext = tmp_path / "ext"
    rows = []
    for k, p in enumerate(train[:5]):  # five training images, re-encoded as JPEG
        q = ext / f"copy{k}.jpg"
        q.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(q), cv2.imread(p), [cv2.IMWRITE_JPEG_QUALITY, 80])
        rows.append([str(q), "COVID-19" if Path(p).name.startswith("C") else "NORMAL", f"x{k}", "copies"])
    plain = synthetic(tmp_path / "plain", "plain", n=8, seed=9)[0]
    rows += [r for r in csv.reader(open(plain))][1:]
    man = tmp_path / "external.csv"
    with open(man, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient_id", "source"], *rows])
    res = audit(run, external=[man], cache_dir=tmp_path / "cache", probes=(), progress=False)["external"]
    assert len(res["overlap"]) == 5 and res["n_external"] == 16
    assert "5 external image(s) are near-duplicates of the run's own and are left out." in res["verdict"]


def test_cross_validation_and_report_intervals(mini_cache, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--folds", "3", "--epochs", "2",
                            "--val", "0.2", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    parent = Path(r.stdout.strip().splitlines()[-1])
    m = json.loads((parent / "metrics.json").read_text())
    assert m["cv"]["n_folds"] == 3 and len(m["folds"]) == 3
    # every patient is held out in exactly one fold, with all of its images
    patients_per_fold = [set(p["patient_id"] for p in csv.DictReader(open(f / "predictions.csv")))
                         for f in sorted(parent.glob("r0-f*"))]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not patients_per_fold[a] & patients_per_fold[b]
    fc = open_cache(mini_cache)
    assert set().union(*patients_per_fold) == set(fc.manifest["patient_id"])
    acc = m["cv"]["accuracy"]
    folds = [f["accuracy"] for f in m["folds"]]
    assert acc["mean"] == pytest.approx(np.mean(folds)) and acc["hi"] - acc["lo"] > 0
    want = cv_interval(folds, m["cv"]["test_over_train"], 3)
    assert (acc["lo"], acc["hi"]) == pytest.approx((max(want["lo"], 0.0), min(want["hi"], 1.0)))
    out = runner.invoke(app, ["report", str(parent)]).stdout
    assert "3 folds x 1 repeats: mean [approximate 95% interval: Nadeau-Bengio corrected" in out


def test_control_probe_of_a_pretrained_run_compares_it_with_random_init_on_the_same_patients(tmp_path, monkeypatch):
    """A 'pretrained' tiny backbone (weights from a file) on a task a random-init backbone also
    solves: both reach AUC 1 on 9 test patients per class, which cannot show them within 0.05
    of each other, so the paired difference reads INCONCLUSIVE with the patients that would
    tell.  (The FLAGGED and CLEAR paths, on synthetic scores: tests/test_verdicts.py.)"""
    from test_backbones import _tiny_build

    from covfeat.extraction.backbones import REGISTRY, Backbone, Scaling, build_backbone, resolve_weights

    monkeypatch.setitem(REGISTRY, "tiny", Backbone("tiny", _tiny_build, Scaling("tiny", 255.0), (7, 7, 8), 0.3))
    weights = tmp_path / "tiny.weights.h5"
    build_backbone(REGISTRY["tiny"], resolve_weights(REGISTRY["tiny"], "none", seed=42), seed=42).save_weights(weights)
    src = synthetic(tmp_path / "clean", "clean")
    cache = extract(src, ExtractConfig(backbone="tiny", weights=str(weights), augment=0), tmp_path / "cache",
                    progress=False)
    run = fit_head(cache, FAST_HEAD, tmp_path / "runs", progress=False)
    res = audit(run, cache_dir=tmp_path / "cache", probes=("control",), progress=False)["control"]
    assert res["status"] == "INCONCLUSIVE" and res["n_compared"] == 18, res["verdict"]
    assert res["verdict"].startswith("INCONCLUSIVE: the run minus a random-init control (same head, split and test "
                                     "patients) is +0.00 ROC AUC [95% CI ")
    lo, hi = res["paired"]["interval"]
    assert lo < -0.05 and hi > 0.05 and res["paired"]["needed_patients"][0] > 9
    assert f"about {res['paired']['needed_patients'][0]} COVID-19 and" in res["verdict"]
    assert "says nothing about transfer learning" not in res["verdict"]


def test_the_audit_refuses_a_weights_file_changed_since_extraction(tmp_path, monkeypatch):
    """The audit extracts again with the run's own weights, checked as predict checks them: a file
    whose bytes changed after extraction would give another backbone's features under this run."""
    from test_backbones import _tiny_build

    from covfeat.extraction.backbones import REGISTRY, Backbone, Scaling, build_backbone, resolve_weights

    monkeypatch.setitem(REGISTRY, "tiny", Backbone("tiny", _tiny_build, Scaling("tiny", 255.0), (7, 7, 8), 0.3))
    weights = tmp_path / "tiny.weights.h5"
    build_backbone(REGISTRY["tiny"], resolve_weights(REGISTRY["tiny"], "none", seed=1), seed=1).save_weights(weights)
    src = synthetic(tmp_path / "clean", "clean", n=12)
    cache = extract(src, ExtractConfig(backbone="tiny", weights=str(weights), augment=0), tmp_path / "cache",
                    progress=False)
    run = fit_head(cache, fit(2), tmp_path / "runs", progress=False)
    build_backbone(REGISTRY["tiny"], resolve_weights(REGISTRY["tiny"], "none", seed=2), seed=2).save_weights(weights)
    r = runner.invoke(app, ["audit", "--run", str(run), "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 1
    assert r.stderr == (f"error: {weights} has changed since extraction (its hash differs); refusing to audit the run "
                        "with other weights.\n")


def test_target_recall_picks_the_threshold_on_validation(mini_cache, tmp_path, monkeypatch):
    import covfeat.head.fit as fit_module

    seen = []  # every (labels, probabilities) the threshold is chosen from
    real = fit_module.threshold_for_recall
    monkeypatch.setattr(fit_module, "threshold_for_recall", lambda y, p, t: seen.append((y, p)) or real(y, p, t))
    run = fit_head(mini_cache, fit(25, learning_rate=0.02, momentum=0.9, target_recall=0.99), tmp_path, progress=False)
    op = json.loads((run / "metrics.json").read_text())["operating_point"]
    assert op["validation"]["covid_recall"] >= 0.99
    assert op["threshold"] == json.loads((run / "config.json").read_text())["threshold"]
    # the threshold is the one the validation rows give: the head's own probabilities of them,
    # recomputed here; the test rows would give another one, so a threshold taken on them fails
    from covfeat.head.runs import Run
    from covfeat.head.split import TEST, VAL

    r, fc = Run(run), open_cache(mini_cache)
    val = np.flatnonzero(r.split() == VAL)
    p_val = r.load_head().predict(fc.read_features(fc.originals(val)), verbose=0)[:, 1]
    tol = 1e-5  # Keras here and the compiled head in fit-head agree to about 1e-6
    assert op["threshold"] == pytest.approx(threshold_for_recall(fc.manifest["label"][val], p_val, 0.99), abs=tol)
    test = np.flatnonzero(r.split() == TEST)
    p_test = r.load_head().predict(fc.read_features(fc.originals(test)), verbose=0)[:, 1]
    assert abs(threshold_for_recall(fc.manifest["label"][test], p_test, 0.99) - op["threshold"]) > 5 * tol
    # and exactly the validation rows were given to it: one test row among them would show here
    assert len(seen) == 1 and len(seen[0][1]) == len(val)
    assert np.array_equal(seen[0][0], fc.manifest["label"][val]) and np.allclose(seen[0][1], p_val, atol=tol)
    preds = list(csv.DictReader(open(run / "predictions.csv")))
    assert all(int(p["pred"]) == int(float(p["p_covid"]) >= op["threshold"]) for p in preds)
    out = runner.invoke(app, ["report", str(run)]).stdout
    assert "at recall target 0.99: test recall" in out and "at recall target 0.99: test specificity" in out


def test_reproduce_prints_paper_beside_measured_and_resumes(mini, tmp_path):
    args = ["reproduce", "--data", str(mini["cohen"]), "--data", str(mini["normal"]), "--weights", "none",
            "--augment", "1", "--epochs", "2", "--backbones", "inception_v3", "--cache-dir", str(tmp_path / "c"),
            "--runs-dir", str(tmp_path / "r")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "inception_v3 paper" in r.stdout and "NOT PRETRAINED" in r.stdout
    line = next(l for l in r.stdout.splitlines() if l.startswith("TP "))
    (metrics,) = (tmp_path / "r").rglob("metrics.json")  # the one run reproduce made
    measured = json.loads(metrics.read_text())["argmax"]["TP"]
    paper, got, diff = line.split()[1:4]
    assert paper == "25"  # the paper's TP for InceptionV3, packaged
    assert got == str(measured) and int(diff) == measured - 25  # the measured TP, from the run itself
    r2 = runner.invoke(app, args)
    assert "Head run already finished" in r2.stderr and "nothing to do" in r2.stderr


def test_explain_writes_heat_maps_and_skips_bad_files(mini, mini_run, tmp_path):
    imgs = sorted((mini["cohen"] / "images").iterdir())[:2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    r = runner.invoke(app, ["explain", "--run", str(mini_run), str(imgs[0]), str(imgs[1]), str(bad),
                            "--out", str(tmp_path / "cams")])
    assert r.exit_code == 0, r.output
    pngs = sorted((tmp_path / "cams").glob("*_gradcam.png"))
    assert [p.name for p in pngs] == sorted(f"{i.stem}_gradcam.png" for i in imgs)
    assert cv2.imread(str(pngs[0])).shape == (448, 448, 3)
    assert "bad.png: skipped: not a decodable image" in r.stdout


def test_grad_cam_points_at_the_evidence():
    """Channel 0 holds a patch in the top-left corner, which the head reads; channel 1 holds
    everything else, which it ignores: the heat map must light the corner and nothing else."""
    import keras

    from covfeat.use.explain import grad_cam

    inp = keras.Input((8, 8, 2))
    backbone = keras.Model(inp, keras.layers.Activation("linear")(inp))
    hin = keras.Input((8, 8, 2))
    corner = keras.layers.Lambda(lambda t: t[:, :2, :2, :1])(hin)
    dense = keras.layers.Dense(2, activation="softmax")
    head = keras.Model(hin, dense(keras.layers.Flatten()(corner)))
    dense.set_weights([np.stack([-np.ones(4), np.ones(4)], 1).astype(np.float32), np.zeros(2, np.float32)])
    x = np.zeros((8, 8, 2), np.float32)
    x[:2, :2, 0] = 1.0
    x[..., 1] = 1.0
    x[:2, :2, 1] = 0.0
    cam, p = grad_cam(backbone, head, x)
    assert p > 0.5
    assert cam[:2, :2].min() == pytest.approx(1.0) and cam[2:, :].max() == 0.0 and cam[:, 2:].max() == 0.0
