"""fit-head on caches on disk: SMOTE on training rows only, run folders, seeds, streaming."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from covfeat.cache import open_cache
from covfeat.cli import app
from covfeat.errors import CacheError, DataError
from covfeat.head import HeadConfig
from covfeat.split import TEST, TRAIN, VAL
from covfeat.train import balance, fit_head, prepare_rows

runner = CliRunner()


def test_balance_is_imblearns_smote_with_parents_read_back():
    from imblearn.over_sampling import SMOTE

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 30)).astype(np.float32)
    y = np.array([1] * 9 + [0] * 31)
    bal = balance(X, y, HeadConfig(seed=3))
    Xr, yr = SMOTE(k_neighbors=5, random_state=3).fit_resample(X, y)
    assert len(bal.parents) == 31 - 9 and (bal.labels == yr).all()
    assert (y[bal.parents] == 1).all()  # parents are minority training rows
    np.testing.assert_allclose(bal.weights.sum(1), 1, atol=1e-6)
    mine = X[bal.parents[:, 0]] * bal.weights[:, :1] + X[bal.parents[:, 1]] * bal.weights[:, 1:]
    np.testing.assert_allclose(mine, Xr[40:], atol=1e-4)


def test_balance_reduces_k_for_a_tiny_minority_and_refuses_one_row():
    X = np.random.default_rng(0).standard_normal((12, 5))
    bal = balance(X, np.array([1, 1, 1] + [0] * 9), HeadConfig())
    assert len(bal.parents) == 6
    with pytest.raises(DataError, match="SMOTE needs at least 2 training rows of the minority class, found 1"):
        balance(X, np.array([1] + [0] * 11), HeadConfig())


def test_fit_head_cli_writes_a_complete_run(mini_cache, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--epochs", "4", "--runs-dir", "runs"])
    assert r.exit_code == 0, r.output
    run = Path(r.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in run.iterdir()) == [
        "cache.json", "config.json", "head.keras", "history.csv", "metrics.json", "predictions.csv", "split.npy"]
    hist = list(csv.DictReader(open(run / "history.csv")))
    assert [int(h["epoch"]) for h in hist] == [1, 2, 3, 4]
    assert set(hist[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    m = json.loads((run / "metrics.json").read_text())
    assert m["pretrained"] is False and m["backbone"] == "inception_v3"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["head"]["epochs"] == 4 and cfg["head"]["learning_rate"] == 1e-4 and cfg["dropout_used"] == 0.5
    info = json.loads((run / "cache.json").read_text())
    assert info["path"] == str(Path(mini_cache).resolve()) and info["key"] in Path(mini_cache).name


def test_smote_rows_never_reach_validation_or_test(mini_cache, tmp_path):
    fc = open_cache(mini_cache)
    parts = prepare_rows(fc, fc.manifest["split"])
    run = fit_head(mini_cache, HeadConfig(epochs=2), tmp_path, progress=False)
    m = json.loads((run / "metrics.json").read_text())
    counts = np.bincount(fc.manifest["label"][parts[TRAIN]], minlength=2)
    assert m["n_train_real"] == len(parts[TRAIN]) and m["n_train_smote"] == abs(counts[1] - counts[0])
    preds = list(csv.DictReader(open(run / "predictions.csv")))
    assert sorted(int(p["row"]) for p in preds) == sorted(parts[TEST].tolist())
    assert m["n_val"] == len(parts[VAL])
    a = m["argmax"]
    assert a["n_covid"] + a["n_normal"] == len(parts[TEST])


def test_same_seed_same_metrics_other_seed_other_run(mini_cache, tmp_path):
    a = fit_head(mini_cache, HeadConfig(epochs=3), tmp_path / "a", progress=False)
    b = fit_head(mini_cache, HeadConfig(epochs=3), tmp_path / "b", progress=False)
    c = fit_head(mini_cache, HeadConfig(epochs=3, seed=5), tmp_path / "c", progress=False)
    ha, hb, hc = ((r / "history.csv").read_text() for r in (a, b, c))
    assert ha == hb and ha != hc
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()


def test_streaming_from_hdf5_gives_the_same_training(mini_cache, tmp_path):
    mem = fit_head(mini_cache, HeadConfig(epochs=3), tmp_path / "m", progress=False)
    st = fit_head(mini_cache, HeadConfig(epochs=3), tmp_path / "s", memory_budget_gb=1e-6, progress=False)
    assert json.loads((st / "metrics.json").read_text())["streamed"] is True
    hm = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(mem / "history.csv"))]
    hs = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(st / "history.csv"))]
    for a, b in zip(hm, hs):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5)


def test_reloaded_run_gives_the_same_predictions(mini_run):
    import keras

    from covfeat.train import _row_samples

    info = json.loads((mini_run / "cache.json").read_text())
    fc = open_cache(info["path"])
    samples, _ = _row_samples(fc)
    preds = list(csv.DictReader(open(mini_run / "predictions.csv")))
    maps = fc.read_features(np.array([samples[int(p["row"])][0] for p in preds]))
    head = keras.models.load_model(mini_run / "head.keras")
    p = head.predict(maps, verbose=0)[:, 1]
    np.testing.assert_allclose(p, [float(x["p_covid"]) for x in preds], atol=1e-5)


@pytest.mark.parametrize("balance_kind", ["none", "class-weight"])
def test_other_balancing(mini_cache, tmp_path, balance_kind):
    run = fit_head(mini_cache, HeadConfig(epochs=2, balance=balance_kind), tmp_path, progress=False)
    assert json.loads((run / "metrics.json").read_text())["n_train_smote"] == 0


def test_config_file_and_flags(mini_cache, tmp_path):
    (tmp_path / "head.toml").write_text("epochs = 2\nlearning_rate = 0.01\n")
    r = runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--config", str(tmp_path / "head.toml"),
                            "--learning-rate", "0.001"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((Path(r.stdout.strip().splitlines()[-1]) / "config.json").read_text())["head"]
    assert cfg["epochs"] == 2 and cfg["learning_rate"] == 0.001
    (tmp_path / "bad.json").write_text('{"epoch": 3}')
    r = runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--config", str(tmp_path / "bad.json")])
    assert r.exit_code == 1 and "unknown key(s) ['epoch']" in r.stderr


def test_fit_head_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["fit-head", "--backbone", "densenet201", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: No complete cache of densenet201 in {tmp_path}; "
                                "run `covfeat extract --backbone densenet201` first.")
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="is not a readable HDF5 cache"):
        open_cache(bad)
