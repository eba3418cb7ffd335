"""fit-head's numba engine trains without TensorFlow: the head's initial weights and its Keras
file come from a template that Keras made once (covfeat.head.template)."""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pytest
from conftest import MINI_SPLIT, fit

from covfeat.head.config import HeadConfig
from covfeat.head.model import build_head
from covfeat.head.template import NOT_IN_TEMPLATE, TEMPLATE, head_template, template_key

RUN_CLI = ("import sys\nfrom covfeat.cli import app\ntry:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
           "heavy = {'tensorflow', 'keras'} & set(sys.modules)\n"  # Keras, too, is seconds to import
           "print('TENSORFLOW-IMPORTED' if heavy else 'NO-TENSORFLOW', file=sys.stderr)\n"
           "sys.exit(code)\n")


def _fit_head_cli(cache, runs, env):
    return subprocess.run([sys.executable, "-c", RUN_CLI, "fit-head", "--cache", str(cache), "--runs-dir", str(runs),
                           "--epochs", "2", "--val", str(MINI_SPLIT["val"]), "--test", str(MINI_SPLIT["test"])],
                          capture_output=True, text=True, env=env)


def test_fit_head_command_imports_tensorflow_only_to_make_the_template(mini_cache, tmp_path):
    env = dict(os.environ, COVFEAT_HEAD_CACHE=str(tmp_path / "templates"))
    first = _fit_head_cli(mini_cache, tmp_path / "a", env)
    assert first.returncode == 0, first.stderr
    assert "TENSORFLOW-IMPORTED" in first.stderr  # the first run with this head made its template
    (made,) = (tmp_path / "templates").iterdir()
    second = _fit_head_cli(mini_cache, tmp_path / "b", env)
    assert second.returncode == 0, second.stderr
    assert "NO-TENSORFLOW" in second.stderr
    assert list((tmp_path / "templates").iterdir()) == [made]
    a, b = (next(p.iterdir()) for p in (tmp_path / "a", tmp_path / "b"))
    for name in ("history.csv", "predictions.csv"):
        assert (a / name).read_text() == (b / name).read_text()
    # a damaged template is made again, with a note, and gives the same run
    f = made / TEMPLATE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    again = _fit_head_cli(mini_cache, tmp_path / "c", env)
    assert again.returncode == 0, again.stderr
    assert "is unusable (checksum differs); making it again with Keras." in again.stderr
    assert "TENSORFLOW-IMPORTED" in again.stderr
    assert hashlib.sha256(f.read_bytes()).hexdigest() == json.loads((made / "layout.json").read_text())["sha256"]
    assert (next((tmp_path / "c").iterdir()) / "predictions.csv").read_text() == (a / "predictions.csv").read_text()


def test_template_holds_kerass_initial_head_and_saves_trained_weights_where_keras_would(tmp_path):
    import keras

    cfg = HeadConfig(dropout=0.3, seed=4, dense_units=24)
    shape = (3, 3, 40)
    model, tail = build_head(shape, cfg)
    tmpl = head_template(shape, cfg)
    for mine, theirs in zip(tmpl.initial_weights(), tail.get_weights()):
        assert np.array_equal(mine, theirs)
    trained = [w + np.float32(0.25) * (k + 1) for k, w in enumerate(tail.get_weights())]
    tmpl.save(tmp_path / "head.keras", trained)
    loaded = keras.models.load_model(tmp_path / "head.keras")
    tail.set_weights(trained)
    model.save(tmp_path / "by_keras.keras")
    assert loaded.get_config() == keras.models.load_model(tmp_path / "by_keras.keras").get_config()
    for mine, theirs in zip(loaded.get_weights(), model.get_weights()):
        assert np.array_equal(mine, theirs)
    x = np.random.default_rng(0).standard_normal((5, *shape)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    # another seed, another template
    assert template_key(shape, cfg)[0] != template_key(shape, HeadConfig(dropout=0.3, seed=5, dense_units=24))[0]


def test_the_numba_run_and_the_tf_engine_run_start_from_the_same_head(mini_cache, tmp_path):
    """The tf engine builds the head with Keras directly, the numba engine reads the template:
    one epoch each with the same seed gives the same loss."""
    from covfeat.head.fit import fit_head
    from covfeat.head.runs import Run

    runs = {e: Run(fit_head(mini_cache, fit(1, engine=e), tmp_path / e, progress=False)) for e in ("numba", "tf")}
    la, lb = (r.history()[0]["loss"] for r in runs.values())
    assert abs(la - lb) < 1e-5


@pytest.mark.slow  # 15 s; the default suite keeps the damaged template (in the first test of this file)
def test_a_swapped_layout_is_caught_and_the_template_made_again(mini_cache, tmp_path):
    env = dict(os.environ, COVFEAT_HEAD_CACHE=str(tmp_path / "templates"))
    assert _fit_head_cli(mini_cache, tmp_path / "a", env).returncode == 0
    (folder,) = (tmp_path / "templates").iterdir()
    layout = json.loads((folder / "layout.json").read_text())
    d = layout["datasets"]
    d[2], d[3] = d[3], d[2]  # gamma and beta have the same shape: only the checksum can tell
    (folder / "layout.json").write_text(json.dumps(layout))
    again = _fit_head_cli(mini_cache, tmp_path / "b", env)
    assert again.returncode == 0, again.stderr
    assert "is unusable (checksum differs); making it again with Keras." in again.stderr
    a, b = (next(p.iterdir()) for p in (tmp_path / "a", tmp_path / "b"))
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()


@pytest.mark.slow  # 15 s; the default suite keeps the damaged template (in the first test of this file)
def test_an_unwritable_template_cache_is_a_note_not_a_failure(mini_cache, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    env = dict(os.environ, COVFEAT_HEAD_CACHE=str(blocker / "heads"))
    r = _fit_head_cli(mini_cache, tmp_path / "a", env)
    assert r.returncode == 0, r.stderr
    assert "note: cannot keep the head template in" in r.stderr and "made it for this run only" in r.stderr
    assert "Traceback" not in r.stderr
    ref = _fit_head_cli(mini_cache, tmp_path / "b", dict(os.environ, COVFEAT_HEAD_CACHE=str(tmp_path / "ok")))
    a, b = (next(p.iterdir()) for p in (tmp_path / "a", tmp_path / "b"))
    assert ref.returncode == 0 and (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()


# One changed value per HeadConfig field. A field added to HeadConfig fails this test until it
# has a value here (and then it must change the template's key) or a reason in NOT_IN_TEMPLATE.
OTHER_HEAD_VALUE = {
    "dropout": 0.4, "dense_units": 64, "activity_l1": 1e-2, "activity_l2": 0.0, "epochs": 7, "batch_size": 16,
    "learning_rate": 1e-2, "momentum": 0.9, "balance": "none", "smote_k": 3, "seed": 1, "engine": "tf",
}


@pytest.mark.parametrize("name", [f.name for f in fields(HeadConfig)])
def test_every_head_field_enters_the_template_key_unless_exempted(name):
    shape, base = (3, 3, 40), HeadConfig(dropout=0.3)
    assert name in OTHER_HEAD_VALUE, f"new HeadConfig field {name!r}: give it a value here or a reason in NOT_IN_TEMPLATE"
    other = replace(base, **{name: OTHER_HEAD_VALUE[name]})
    if name in NOT_IN_TEMPLATE:
        assert template_key(shape, other)[0] == template_key(shape, base)[0]
    else:
        assert template_key(shape, other)[0] != template_key(shape, base)[0], name
    assert set(NOT_IN_TEMPLATE) < {f.name for f in fields(HeadConfig)}  # no reason for a field that is gone
    assert set(template_key(shape, base)[1]["head"]) == {f.name for f in fields(HeadConfig)} - set(NOT_IN_TEMPLATE)


def test_the_feature_shape_enters_the_template_key():
    cfg = HeadConfig(dropout=0.3)
    assert template_key((3, 3, 40), cfg)[0] != template_key((3, 3, 41), cfg)[0]


@pytest.mark.parametrize("name", sorted(NOT_IN_TEMPLATE))
def test_an_exempted_field_leaves_the_untrained_head_as_it_is(name):
    """NOT_IN_TEMPLATE's reasons hold: Keras builds the same head, with the same initial weights."""
    shape, base = (3, 3, 40), HeadConfig(dropout=0.3)
    (m1, t1), (m2, t2) = build_head(shape, base), build_head(shape, replace(base, **{name: OTHER_HEAD_VALUE[name]}))
    assert m1.get_config() == m2.get_config()
    assert all(np.array_equal(a, b) for a, b in zip(t1.get_weights(), t2.get_weights(), strict=True))
