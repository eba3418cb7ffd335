"""A damaged run folder is named in one line by every reader (covfeat issue 18, "Low": a
``metrics.json`` emptied to ``{}`` made ``report`` end in ``KeyError: 'argmax'``)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from covfeat.cli import app

runner = CliRunner()


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _one_error_line(r, file):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1, r.output
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.output, r.output
    assert str(file) in lines[-1] and "is damaged" in lines[-1], lines[-1]
    return lines[-1]


def test_report_names_an_emptied_metrics_file_in_one_line(mini_run, tmp_path):
    """The issue's own case, as a user meets it: `covfeat report` in a process of its own."""
    run = _copy(mini_run, tmp_path)
    (run / "metrics.json").write_text("{}")
    env = dict(os.environ, COVFEAT_NO_PROGRESS="1")
    r = subprocess.run([sys.executable, "-m", "covfeat.cli", "report", str(run)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {run / 'metrics.json'} is damaged (no 'backbone'); restore the "
                                             "run folder or fit the run again."], r.stderr


DAMAGE = {  # file -> what is done to it, the command that reads it, and the words of its line
    "metrics without a table": ("metrics.json", lambda f: f.write_text('{"backbone": "x", "weights": {}}'),
                                ["report"], "no 'argmax' or 'cv' table of metrics"),
    "truncated metrics": ("metrics.json", _truncate, ["report"], "not readable as JSON"),
    "metrics a list": ("metrics.json", lambda f: f.write_text("[]"), ["report"], "expected a JSON object, got list"),
    "truncated config": ("config.json", _truncate, ["report"], "not readable as JSON"),
    "config without threshold": ("config.json", lambda f: f.write_text('{"extract": {"backbone": "x"}}'),
                                 ["report"], "no 'threshold'"),
    "truncated cache.json": ("cache.json", _truncate, ["report"], "not readable as JSON"),
    "truncated audit": ("audit.json", lambda f: f.write_text('{"metadata": {"sta'), ["report"],
                        "not readable as JSON"),
    "missing predictions": ("predictions.csv", lambda f: f.unlink(), ["report", "--prevalence", "0.1"],
                            "the file is missing"),
    "missing predictions, figures": ("predictions.csv", lambda f: f.unlink(), ["report", "--out", "{tmp}/rep"],
                                     "the file is missing"),
    "truncated predictions": ("predictions.csv", lambda f: f.write_text(f.read_text()[:-40]),
                              ["report", "--prevalence", "0.1"], "a value is not a number"),
    "truncated split": ("split.npy", _truncate, ["export", "--out", "{tmp}/m.keras"], "not a .npy file"),
    "split of another cache": ("split.npy", lambda f: np.save(f, np.zeros(3, np.int8)),
                               ["export", "--out", "{tmp}/m.keras"], "3 rows, but its cache has"),
    "truncated head": ("head.keras", _truncate, ["predict", "{normal}"], "Keras cannot load it"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_reader_names_the_damaged_run_file(case, mini, mini_run, tmp_path):
    name, damage, cmd, words = DAMAGE[case]
    run = _copy(mini_run, tmp_path)
    if name == "audit.json":
        (run / name).write_text("{}")
    damage(run / name)
    args = [a.format(tmp=tmp_path, normal=mini["normal"]) for a in cmd]
    args = args[:1] + (["--run", str(run)] if args[0] in ("export", "predict") else [str(run)]) + args[1:]
    r = runner.invoke(app, args)
    assert words in _one_error_line(r, run / name)


def test_predict_names_a_head_that_takes_features_of_another_shape(mini, mini_run, tmp_path):
    """A head.keras of the wrong shape (another backbone's) is refused before any image is read."""
    import keras

    run = _copy(mini_run, tmp_path)
    inp = keras.Input((3, 3, 8))
    keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inp))).save(
        run / "head.keras")
    r = runner.invoke(app, ["predict", "--run", str(run), str(mini["normal"])])
    assert "it takes features of shape (3, 3, 8), but inception_v3 gives" in _one_error_line(r, run / "head.keras")
