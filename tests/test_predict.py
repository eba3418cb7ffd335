"""predict and export on new image files, with the run's own preprocessing and weights."""

import csv
import json
import shutil

import numpy as np
from typer.testing import CliRunner

from covfeat.cli import app

runner = CliRunner()


def test_predict_folder_with_a_corrupt_file(mini, mini_run, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(mini["normal"], folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    r = runner.invoke(app, ["predict", "--run", str(mini_run), str(folder), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert any("broken.png" in l and "skipped: not a decodable image" in l for l in lines)
    assert "1 of 9 image(s) could not be read" in r.stderr and "NOT PRETRAINED" in r.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    good = [row for row in rows if not row["error"]]
    assert len(good) == 8 and all(0 <= float(row["p_covid"]) <= 1 for row in good)
    assert all(row["label"] in ("COVID-19", "NORMAL") for row in good)


def test_predict_matches_the_cached_features_path(mini, mini_run):
    """New-image prediction = the run's head on the cached maps of the same images."""
    from covfeat.head.runs import Run
    from covfeat.store.reader import open_cache
    from covfeat.use.predict import predict

    run = Run(mini_run)
    fc = open_cache(run.cache_info["path"])
    paths = list(fc.manifest["path"][:4])
    got = [r["p_covid"] for r in predict(mini_run, paths)]
    want = run.load_head().predict(fc.read_features(fc.originals(range(4))), verbose=0)[:, 1]
    np.testing.assert_allclose(got, want, atol=2e-3)  # the cache stores float16


def test_export_after_target_recall_gives_predicts_labels(mini, mini_cache, tmp_path):
    """The exported model carries the run's threshold: its labels equal covfeat predict's."""
    from conftest import fit

    from covfeat.head.fit import fit_head
    from covfeat.head.runs import Run
    from covfeat.use.predict import Predictor, load_exported, predict

    run = fit_head(mini_cache, fit(20, target_recall=0.9, learning_rate=0.02, momentum=0.9), tmp_path / "runs",
                   progress=False)
    thr = Run(run).threshold
    assert thr != 0.5  # the operating point moved the threshold
    r = runner.invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "m.keras")])
    assert r.exit_code == 0, r.output
    model = load_exported(r.stdout.strip().splitlines()[-1])
    assert model.get_layer("covid").threshold == thr
    paths = sorted(mini["cohen"].glob("images/*")) + sorted(mini["normal"].iterdir())
    pipeline = Predictor(run).pipeline
    probs, covid = model.predict(np.stack([pipeline.decode(p) for p in paths]), verbose=0)
    rows = predict(run, paths)
    np.testing.assert_allclose(probs[:, 1], [row["p_covid"] for row in rows], atol=1e-5)
    exported = ["COVID-19" if c else "NORMAL" for c in covid[:, 0]]
    assert exported == [row["label"] for row in rows]
    # the threshold is what decides: at 0.5 some of these labels would differ
    assert [("COVID-19" if row["p_covid"] >= 0.5 else "NORMAL") for row in rows] != exported


def test_export_refuses_another_suffix_before_work(mini_run, tmp_path):
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--out", str(tmp_path / "model.txt")])
    assert r.exit_code == 1
    assert r.stderr == f"error: --out: expected a file name ending in .keras, got '{tmp_path / 'model.txt'}'.\n"
    assert not (tmp_path / "model.txt").exists()


def test_a_run_whose_weights_are_gone_is_refused(mini, mini_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mini_run, run)
    info = json.loads((run / "cache.json").read_text())
    info["weights"].update(kind="file", identity="file:sha256=00", path=str(tmp_path / "gone.h5"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["extract"]["weights"] = info["weights"]
    (run / "cache.json").write_text(json.dumps(info))
    (run / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["predict", "--run", str(run), str(mini["normal"])])
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: The run's backbone weights file '{tmp_path / 'gone.h5'}' is gone; put it back to predict."


def test_predict_with_no_images_and_a_bad_out_are_one_line_errors(mini, mini_run, tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["predict", "--run", str(mini_run), str(tmp_path / "empty")])
    assert r.exit_code == 1 and r.stderr.startswith("error: No image files given (folders are searched for ")
    r = runner.invoke(app, ["predict", "--run", str(mini_run), str(mini["normal"]), "--out", str(tmp_path / "p.txt")])
    assert r.exit_code == 1
    assert r.stderr == f"error: --out: expected a file name ending in .csv or .json, got '{tmp_path / 'p.txt'}'.\n"
