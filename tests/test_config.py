"""Settings check themselves before any work, in one style, and the cache key is derived from them."""

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.core.errors import ConfigError
from covfeat.extraction.config import NOT_IN_KEY, ExtractConfig, JitterConfig, LungsConfig, OcclusionConfig, key_config
from covfeat.head.config import FitConfig, HeadConfig, SplitConfig, fit_config
from covfeat.store.key import cache_key

runner = CliRunner()


@pytest.mark.parametrize("cls", [ExtractConfig, JitterConfig, OcclusionConfig, SplitConfig, HeadConfig, FitConfig])
def test_every_setting_has_a_rule(cls):
    for f in fields(cls):
        assert f.metadata.get("rule") is not None or f.metadata.get("nested") or f.name == "backbone", f.name


# One changed value per ExtractConfig field. A field added to ExtractConfig fails this test
# until it has a value here (and then it must change the key) or a reason in NOT_IN_KEY.
OTHER_VALUE = {
    "backbone": "densenet201", "preprocess": "backbone", "augment": 2, "seed": 1, "views": ("PA", "AP"),
    "dtype": "float32", "jitter": JitterConfig(rotation=5), "occlusion": OcclusionConfig(kind="box"),
    "scaled_decode": False, "weights": "/some/file.h5", "batch_size": 4, "workers": 1, "max_pixels": 10**6,
    "max_file_mb": 10.0, "min_side": 32, "max_aspect": 8.0, "on_conflict": "skip", "precision": "bfloat16",
    # In NOT_IN_KEY: a lungs model enters the key by its hash, which only a resolved plan has;
    # tests/test_lungs_extract.py checks that the hash and --outside change the key and the folder does not.
    "lungs": LungsConfig(),
}


def _key(cfg: ExtractConfig, identity: str = "none:seed=0") -> str:
    return cache_key(key_config(cfg, identity), [{"sha256": "ab", "label": 1}])


@pytest.mark.parametrize("name", [f.name for f in fields(ExtractConfig)])
def test_every_extract_field_enters_the_cache_key_unless_exempted(name):
    base = ExtractConfig(backbone="inception_v3", weights="none")
    assert name in OTHER_VALUE, f"new ExtractConfig field {name!r}: give it a value here or a reason in NOT_IN_KEY"
    other = replace(base, **{name: OTHER_VALUE[name]}) if name != "weights" else base
    if name in NOT_IN_KEY:
        assert _key(other) == _key(base)
    else:
        assert _key(other) != _key(base), name
    # precision enters only as bfloat16 (with its route), so float32 caches keep their keys (issue 20)
    assert set(key_config(base, "x")) == {f.name for f in fields(ExtractConfig)} - set(NOT_IN_KEY) - {"precision"} \
        | {"weights"}


def test_weights_enter_the_key_by_identity_not_by_argument():
    cfg = ExtractConfig(backbone="inception_v3", weights="none")
    assert _key(cfg, "file:sha256=aa") != _key(cfg, "file:sha256=bb")
    assert _key(replace(cfg, weights="/a/w.h5"), "file:sha256=aa") == _key(replace(cfg, weights="/b/w.h5"),
                                                                           "file:sha256=aa")


def test_defaults_are_the_papers():
    h = HeadConfig()
    assert (h.epochs, h.batch_size, h.learning_rate, h.momentum, h.dense_units) == (100, 8, 1e-4, 0.5, 128)
    assert (h.activity_l1, h.activity_l2, h.balance) == (1e-3, 1e-3, "smote")
    assert SplitConfig() == SplitConfig(val=0.1, test=0.3, by="patient", seed=0)


# fit-head with a bad value: one line, exit 1, before any work. The cache folder is empty, so
# any work would end in "No complete cache ..." instead of the pinned message.
BAD_FLAGS = [
    (["--learning-rate", "-1"], "--learning-rate: expected a number in (0, 10], got -1.0."),
    (["--momentum", "-5"], "--momentum: expected a number in [0, 1), got -5.0."),
    (["--dense-units", "0"], "--dense-units: expected an integer from 1 to 65536, got 0."),
    (["--epochs", "0"], "--epochs: expected an integer from 1 to 100000, got 0."),
    (["--batch-size", "0"], "--batch-size: expected an integer from 1 to 1048576, got 0."),
    (["--dropout", "1"], "--dropout: expected a number in [0, 1), or unset (the paper's rate for the backbone), got 1.0."),
    (["--activity-l1", "-0.1"], "--activity-l1: expected a number >= 0, got -0.1."),
    (["--balance", "oversample"], "--balance: expected one of 'smote', 'none', 'class-weight', got 'oversample'."),
    (["--smote-k", "0"], "--smote-k: expected an integer from 1 to 1000, got 0."),
    (["--engine", "jax"], "--engine: expected one of 'numba', 'tf', got 'jax'."),
    (["--seed", "-1"], "--seed: expected an integer >= 0, got -1."),
    (["--target-recall", "1.5"], "--target-recall: expected a number in (0, 1], or unset (the argmax rule), got 1.5."),
    (["--target-recall", "0.9", "--val", "0"],
     "--target-recall: picks the threshold on validation rows; expected --val > 0, got 0."),
    (["--test", "0"], "--test: expected a number in (0, 1), got 0.0."),
    (["--val", "0.5", "--test", "0.5"], "--val + --test: expected a sum below 1, leaving training rows, got 1.0."),
    (["--split-by", "site"], "--split-by: expected one of 'patient', 'image', got 'site'."),
    (["--folds", "1"], "--folds: expected 0 (the split) or an integer from 2 to 100, got 1."),
    (["--repeats", "3"], "--repeats: expected --folds as well (repeats are of cross-validation), got 3."),
    (["--memory-budget", "0"], "--memory-budget: expected a number > 0, got 0.0."),
    (["--folds", "2", "--val", "0.5"], "--val: expected a share below 0.5 with --folds 2 (the validation share is carved "
                                       "from each fold's training part), got 0.5."),
]


@pytest.mark.parametrize("args,message", BAD_FLAGS, ids=[a[0] for a, _ in BAD_FLAGS])
def test_bad_fit_head_flags_are_one_line_before_any_work(tmp_path, args, message):
    r = runner.invoke(app, ["fit-head", "--backbone", "inception_v3", "--cache-dir", str(tmp_path), *args])
    assert r.exit_code == 1
    assert r.stderr == f"error: {message}\n"
    assert not list(tmp_path.iterdir()) and not Path("runs").exists()


BAD_FILES = [
    ('{"epochs": "ten"}', "epochs: expected an integer from 1 to 100000, got 'ten'."),
    ('{"learning_rate": true}', "learning_rate: expected a number in (0, 10], got True."),
    ('{"epoch": 3}', "unknown key(s) ['epoch']; known: "),
    ('[1, 2]', "expected a table of settings, got list."),
    ('{"epochs": 3', "not valid JSON"),
]


@pytest.mark.parametrize("text,message", BAD_FILES)
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    f = tmp_path / "head.json"
    f.write_text(text)
    r = runner.invoke(app, ["fit-head", "--backbone", "inception_v3", "--cache-dir", str(tmp_path / "c"),
                            "--config", str(f)])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: {f}: {message}")


def test_config_file_keys_cover_head_split_and_operating_point(tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text('epochs = 7\nlearning_rate = 0.01\ntest = 0.25\nsplit_by = "image"\ntarget_recall = 0.9\n')
    fit = fit_config(f, momentum=0.8, test=0.2)  # flags win over the file
    assert fit.head.epochs == 7 and fit.head.learning_rate == 0.01 and fit.head.momentum == 0.8
    assert fit.split == SplitConfig(test=0.2, by="image") and fit.target_recall == 0.9


@pytest.mark.parametrize("args,message", [
    (["--augment", "-1"], "--augment: expected an integer from 0 to 100, got -1."),
    (["--dtype", "int8"], "--dtype: expected one of 'float16', 'float32', got 'int8'."),
    (["--workers", "0"], "--workers: expected an integer from 1 to 64, got 0."),
    (["--views", ","], "--views: expected a non-empty list of non-empty strings, got ()."),
    (["--occlude", "/no/such/masks"], "--occlude: expected a folder of lung masks, got '/no/such/masks'."),
])
def test_bad_extract_flags_are_one_line_before_any_work(args, message):
    r = runner.invoke(app, ["extract", "--backbone", "inception_v3", "--weights", "none", *args])
    assert r.exit_code == 1 and r.stderr == f"error: {message}\n"
    assert not Path("cache").exists()


def test_library_calls_validate_too():
    with pytest.raises(ConfigError, match=r"^--learning-rate: expected a number in \(0, 10\], got -1.$"):
        HeadConfig(learning_rate=-1)
    with pytest.raises(ConfigError, match="--split-by: expected one of 'patient', 'image', got 'site'."):
        replace(SplitConfig(), by="site")
    assert HeadConfig().resolved(type("B", (), {"dropout": 0.2})()).dropout == 0.2
    assert HeadConfig(dropout=0.0).resolved(type("B", (), {"dropout": 0.2})()).dropout == 0.0


def test_a_run_records_every_fit_setting(mini_cache, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--epochs", "2", "--test", "0.25",
                            "--split-seed", "3", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    from covfeat.head.runs import Run

    run = Run(r.stdout.strip().splitlines()[-1])
    fit = run.fit_config()
    assert fit.split == SplitConfig(test=0.25, seed=3) and fit.head.epochs == 2 and fit.head.dropout == 0.5
    assert json.loads((run.path / "config.json").read_text())["extract"]["backbone"] == "inception_v3"
