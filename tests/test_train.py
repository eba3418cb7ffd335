"""fit-head on caches on disk: SMOTE on training rows only, run folders, seeds, streaming."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MINI_SPLIT, fit
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.core.errors import CacheError
from covfeat.head.config import HeadConfig, SplitConfig
from covfeat.head.fit import fit_head, make_split, rows_by_split
from covfeat.head.split import TEST, TRAIN, VAL
from covfeat.store.reader import open_cache

runner = CliRunner()


def test_fit_head_cli_writes_a_complete_run(mini_cache, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--epochs", "4", "--runs-dir", "runs",
                            "--val", "0.2", "--test", "0.3"])
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
    assert cfg["head"]["epochs"] == 4 and cfg["head"]["learning_rate"] == 1e-4
    assert cfg["head"]["dropout"] == 0.5  # resolved from the backbone, once, into the config
    assert cfg["split"] == {"val": 0.2, "test": 0.3, "by": "patient", "seed": 0, "near_duplicates": "group"}
    info = json.loads((run / "cache.json").read_text())
    assert info["path"] == str(Path(mini_cache).resolve()) and info["key"] in Path(mini_cache).name


def test_smote_rows_never_reach_validation_or_test(mini_cache, tmp_path):
    fc = open_cache(mini_cache)
    parts = rows_by_split(fc, make_split(fc, SplitConfig(**MINI_SPLIT)))
    run = fit_head(mini_cache, fit(2), tmp_path, progress=False)
    m = json.loads((run / "metrics.json").read_text())
    counts = np.bincount(fc.manifest["label"][parts[TRAIN]], minlength=2)
    assert m["n_train_real"] == len(parts[TRAIN]) and m["n_train_smote"] == abs(counts[1] - counts[0])
    preds = list(csv.DictReader(open(run / "predictions.csv")))
    assert sorted(int(p["row"]) for p in preds) == sorted(parts[TEST].tolist())
    assert m["n_val"] == len(parts[VAL])
    a = m["argmax"]
    assert a["n_covid"] + a["n_normal"] == len(parts[TEST])


def test_same_seed_same_metrics_other_seed_other_run(mini_cache, tmp_path):
    a = fit_head(mini_cache, fit(3), tmp_path / "a", progress=False)
    b = fit_head(mini_cache, fit(3), tmp_path / "b", progress=False)
    c = fit_head(mini_cache, fit(3, seed=5), tmp_path / "c", progress=False)
    ha, hb, hc = ((r / "history.csv").read_text() for r in (a, b, c))
    assert ha == hb and ha != hc
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()


def test_streaming_from_hdf5_gives_the_same_training(mini_cache, tmp_path):
    from dataclasses import replace

    mem = fit_head(mini_cache, fit(3), tmp_path / "m", progress=False)
    st = fit_head(mini_cache, replace(fit(3), memory_budget_gb=1e-6), tmp_path / "s", progress=False)
    assert json.loads((st / "metrics.json").read_text())["streamed"] is True
    hm = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(mem / "history.csv"))]
    hs = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(st / "history.csv"))]
    for a, b in zip(hm, hs):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5)


def test_reloaded_run_gives_the_same_predictions(mini_run):
    from covfeat.head.runs import Run

    run = Run(mini_run)
    fc = open_cache(run.cache_info["path"])
    preds = run.predictions()
    p = run.load_head().predict(fc.read_features(fc.originals(preds["row"])), verbose=0)[:, 1]
    np.testing.assert_allclose(p, preds["p_covid"], atol=1e-5)


@pytest.mark.parametrize("balance_kind", ["none", "class-weight"])
def test_other_balancing(mini_cache, tmp_path, balance_kind):
    run = fit_head(mini_cache, fit(2, balance=balance_kind), tmp_path, progress=False)
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
    with pytest.raises(CacheError, match=r"is damaged \(not a readable HDF5 cache: .*--rebuild"):
        open_cache(bad)


def test_changing_the_split_reuses_the_cache(mini_cache, tmp_path):
    """fit-head --test 0.25 trains on the existing cache: no extraction, another split, recorded."""
    before = sorted(p.name for p in Path(mini_cache).parent.iterdir())
    r = runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--epochs", "1", "--test", "0.25",
                            "--split-by", "image", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    run = Path(r.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in Path(mini_cache).parent.iterdir()) == before
    assert json.loads((run / "cache.json").read_text())["path"] == str(Path(mini_cache).resolve())
    fc = open_cache(mini_cache)
    want = make_split(fc, SplitConfig(test=0.25, by="image"))
    np.testing.assert_array_equal(np.load(run / "split.npy"), want)
    assert not np.array_equal(want, make_split(fc, SplitConfig()))


def test_the_default_split_groups_patients(mini_cache):
    fc = open_cache(mini_cache)
    split = make_split(fc, SplitConfig())
    man = fc.manifest
    for p in np.unique(man["patient_id"]):
        assert len(np.unique(split[man["patient_id"] == p])) == 1


def _synthetic_cache(path: Path) -> Path:
    """A cache written straight from seeded synthetic maps (no backbone): stage two alone."""
    from covfeat.store.index import assemble
    from covfeat.store.shards import ShardStore, plan_shards

    rng = np.random.default_rng(0)
    n_covid, n_normal, V, shape = 24, 36, 3, (3, 3, 32)
    labels = np.array([1] * n_covid + [0] * n_normal)
    patients = [f"c:{i // 2}" for i in range(n_covid)] + [f"n:{i}" for i in range(n_normal)]
    direction = rng.standard_normal(shape)
    base = rng.standard_normal((len(labels), *shape)) + 0.6 * labels[:, None, None, None] * direction
    feats = np.stack([base + 0.3 * rng.standard_normal(base.shape) * (v > 0) for v in range(V)], 1).astype(np.float16)
    n = len(labels)
    config = {"backbone": "pinfake", "seed": 0,
              "weights": {"identity": "none:seed=0", "kind": "none", "pretrained": False, "label": "random"}}
    rows = [{"path": f"/img/{i:03d}.png", "label": int(labels[i]), "patient_id": patients[i], "source": "syn",
             "view": "", "sha256": f"{i:064x}"} for i in range(n)]
    store = ShardStore(path, "pinned")
    specs = plan_shards(rows, "pinned")
    for spec in specs:
        m = len(spec.rows)
        store.write(spec, [rows[i]["sha256"] for i in spec.rows], feats[list(spec.rows)].reshape(m * V, *shape),
                    np.repeat(np.arange(m), V), np.tile(np.arange(V), m), np.zeros((m * V, 4), np.float32), {}, {})
    assemble(path, store, specs, config=config, manifest=rows, feature_shape=shape, dtype="float16", extra={})
    return path


@pytest.mark.parametrize("name", ["default", "recall"])
def test_stage_two_numbers_are_pinned(monkeypatch, tmp_path, name):
    """The split, SMOTE, the epochs and the threshold give the numbers the code gave before the
    restructuring (tests/data/pinned_stage_two.json, written by commit ca3506f's code)."""
    import dataclasses

    from covfeat.extraction.backbones import REGISTRY
    from covfeat.head.config import FitConfig
    from covfeat.head.runs import Run

    monkeypatch.setitem(REGISTRY, "pinfake", dataclasses.replace(REGISTRY["inception_v3"], name="pinfake",
                                                                 feature_shape=(3, 3, 32), dropout=0.5))
    cache = _synthetic_cache(tmp_path / "pinfake-none-0.h5")
    head = {"default": HeadConfig(epochs=12, learning_rate=0.01, momentum=0.9),
            "recall": HeadConfig(epochs=12, learning_rate=0.01, momentum=0.9, seed=2, balance="class-weight")}[name]
    fitc = FitConfig(head=head, split=SplitConfig(val=0.2, test=0.3), target_recall=0.9 if name == "recall" else None)
    run = Run(fit_head(cache, fitc, tmp_path / "runs", progress=False))
    pinned = json.loads((Path(__file__).parent / "data" / "pinned_stage_two.json").read_text())[name]
    pr = run.predictions()
    assert sorted(pr["path"]) == sorted(pinned["predictions"])  # the same test rows
    for path, p, pred in zip(pr["path"], pr["p_covid"], pr["pred"]):
        want_p, want_pred = pinned["predictions"][path]
        assert p == pytest.approx(want_p, abs=2e-4), path
        assert pred == want_pred or abs(p - run.threshold) < 1e-3, path
    assert run.threshold == pytest.approx(pinned["threshold"], abs=2e-4)
    np.testing.assert_allclose([h["loss"] for h in run.history()], pinned["loss"], atol=2e-4)


def test_cross_validation_folds_equal_single_runs_on_their_splits(mini_cache, tmp_path):
    """Cross-validation loads every row's maps once for all folds; each fold's numbers are
    those of fit-head on that fold's split alone, and those of a CV streamed from HDF5
    (a memory budget too small to hold the rows)."""
    from dataclasses import replace

    from covfeat.head.runs import Run

    cv = Run(fit_head(mini_cache, fit(3, folds=3), tmp_path / "cv", progress=False))
    streamed = Run(fit_head(mini_cache, replace(fit(3, folds=3), memory_budget_gb=1e-6), tmp_path / "st",
                            progress=False))
    folds = cv.folds()
    assert len(folds) == 3
    for fold, other in zip(folds, streamed.folds()):
        single = Run(fit_head(mini_cache, fit(3), tmp_path / "one", split=fold.split(), progress=False))
        assert other.metrics["streamed"] is True and fold.metrics["streamed"] is False
        for name in ("history.csv", "predictions.csv"):
            assert (fold.path / name).read_text() == (single.path / name).read_text(), name
            assert (other.path / name).read_text() == (single.path / name).read_text(), name


def test_cross_validation_takes_each_folds_numbers_from_memory(mini_cache, tmp_path, monkeypatch):
    """Cross-validation opens the cache and looks its backbone up once for every fold, and takes
    each fold's metrics from the fold's own fit instead of reading its run folder back; the
    parent's numbers are those the fold folders hold."""
    import covfeat.head.fit as fitmod
    import covfeat.head.runs as runs
    from covfeat.extraction.backbones import get_backbone
    from covfeat.head.runs import Run
    from covfeat.trust.metrics import COUNT_KEYS, METRIC_KEYS, cv_interval

    looked_up = []
    monkeypatch.setattr(fitmod, "get_backbone", lambda name: looked_up.append(name) or get_backbone(name))

    def no_reading_back(path):
        raise AssertionError(f"cross-validation read {path} back")

    monkeypatch.setattr(runs, "Run", no_reading_back)
    parent = fit_head(mini_cache, fit(2, folds=3, target_recall=0.5), tmp_path, progress=False)
    monkeypatch.undo()
    assert looked_up == ["inception_v3"]
    cv = Run(parent)
    folds = [f.metrics for f in cv.folds()]
    assert len(folds) == 3

    def same(a, b):  # as metrics.json writes them (an undefined metric, NaN, equals itself there)
        return json.dumps(a, default=float) == json.dumps(b, default=float)

    assert same(cv.metrics["folds"], [m["argmax"] for m in folds])
    ratio = float(np.mean([m["n_test"] / m["n_train_real"] for m in folds]))
    for k in METRIC_KEYS:  # every interval of a proportion or an AUC clipped to [0, 1] (issue 16, item 8)
        unit = None if k in COUNT_KEYS else (0.0, 1.0)
        assert same(cv.metrics["cv"][k], cv_interval([m["argmax"][k] for m in folds], ratio, 3, bounds=unit)), k
    for k in ("covid_recall", "covid_precision", "specificity"):
        assert same(cv.metrics["cv"][f"op_{k}"], cv_interval([m["operating_point"]["test"][k] for m in folds], ratio, 3,
                                                             bounds=(0.0, 1.0)))
