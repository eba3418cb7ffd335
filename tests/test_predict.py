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
    import keras

    from covfeat.cache import open_cache
    from covfeat.predict import predict
    from covfeat.train import _row_samples

    fc = open_cache(json.loads((mini_run / "cache.json").read_text())["path"])
    samples, _ = _row_samples(fc)
    paths = list(fc.manifest["path"][:4])
    got = [r["p_covid"] for r in predict(mini_run, paths)]
    head = keras.models.load_model(mini_run / "head.keras")
    want = head.predict(fc.read_features(np.array([samples[i][0] for i in range(4)])), verbose=0)[:, 1]
    np.testing.assert_allclose(got, want, atol=2e-3)  # the cache stores float16


def test_export_matches_predict(mini, mini_run, tmp_path):
    import keras

    from covfeat.extract import decode_min_side
    from covfeat.images import load
    from covfeat.predict import predict

    r = runner.invoke(app, ["export", "--run", str(mini_run), "--out", str(tmp_path / "m.keras")])
    assert r.exit_code == 0, r.output
    model = keras.models.load_model(r.stdout.strip().splitlines()[-1])
    paths = sorted(mini["cohen"].glob("images/*"))[:3]
    x = np.stack([load(p, min_side=decode_min_side(True)) for p in paths])
    got = model.predict(x, verbose=0)[:, 1]
    want = [row["p_covid"] for row in predict(mini_run, paths)]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_run_whose_weights_are_gone_is_refused(mini_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mini_run, run)
    info = json.loads((run / "cache.json").read_text())
    info["weights"].update(kind="file", identity="file:sha256=00", path=str(tmp_path / "gone.h5"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["extract"]["weights"] = info["weights"]
    (run / "cache.json").write_text(json.dumps(info))
    (run / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["predict", "--run", str(run), str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: The run's backbone weights file '{tmp_path / 'gone.h5'}' is gone; put it back to predict."
