"""covfeat export --format savedmodel / onnx (issue 21): files a server loads without covfeat,
checked against covfeat predict on the same images, and the contract written beside them."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.core.errors import ConfigError

runner = CliRunner()

# image_bytes vs predict: the in-graph decoding lands within 1 grey level of InputPipeline's pixels
# (tests/test_serving_decode.py); seen here: |dp| 6e-8 against a spread of p_covid of 1e-4 (6e-4 of it).
BYTES_SHARE = 0.02

# Run in a fresh interpreter: importing covfeat fails, and it must never have been imported.
LOADER = '''
import importlib.abc, json, sys
class NoCovfeat(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "covfeat" or name.startswith("covfeat."):
            raise ImportError("covfeat is not installed on this server")
sys.meta_path.insert(0, NoCovfeat())
import numpy as np
fmt, model, pixels, files, result = sys.argv[1:6]
x = np.load(pixels)
files = json.loads(files)
out = {}
if fmt == "savedmodel":
    import tensorflow as tf
    m = tf.saved_model.load(model)
    got = m.signatures["pixels"](pixels=tf.constant(x))
    out["pixels"] = {k: v.numpy().tolist() for k, v in got.items()}
    if files:
        got = m.signatures["image_bytes"](image_bytes=tf.constant([open(f, "rb").read() for f in files]))
        out["image_bytes"] = {k: v.numpy().tolist() for k, v in got.items()}
        out["decoded"] = m.signatures["decode"](image_bytes=tf.constant([open(f, "rb").read() for f in files]))[
            "pixels"].numpy().tolist()
    assert set(m.signatures) >= {"pixels", "image_bytes", "decode", "serving_default"}, list(m.signatures)
else:
    import onnxruntime as ort
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [i.name for i in s.get_inputs()] == ["pixels"]
    out["pixels"] = dict(zip([o.name for o in s.get_outputs()], [v.tolist() for v in s.run(None, {"pixels": x})]))
try:
    import covfeat  # noqa: F401
    raise SystemExit("covfeat was importable")
except ImportError:
    pass
assert not [m for m in sys.modules if m == "covfeat" or m.startswith("covfeat.")]
json.dump(out, open(result, "w"))
'''


def serve(fmt, model, pixels, files, tmp_path) -> dict:
    np.save(tmp_path / "x.npy", pixels)
    r = subprocess.run([sys.executable, "-c", LOADER, fmt, str(model), str(tmp_path / "x.npy"),
                        json.dumps([str(f) for f in files]), str(tmp_path / "out.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


@pytest.fixture(scope="module")
def images(mini):
    return sorted(mini["cohen"].glob("images/*"))[:4] + sorted(mini["normal"].iterdir())[:4]


@pytest.fixture(scope="module")
def predicted(mini_run, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "x.json"
    r = runner.invoke(app, ["predict", "--run", str(mini_run), *map(str, images), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def pixels(mini_run, images):
    from covfeat.use.predict import Predictor

    pipeline = Predictor(mini_run).pipeline
    return np.stack([pipeline.decode(p) for p in images]).astype(np.float32)


def agree(got: dict, rows: list[dict], bound: float) -> None:
    np.testing.assert_allclose(got["p_covid"], [r["p_covid"] for r in rows], atol=bound)
    np.testing.assert_allclose(got["p_covid_raw"], [r["p_covid_raw"] for r in rows], atol=bound)
    if bound <= 1e-4:
        assert ["COVID-19" if c else "NORMAL" for c in got["covid"]] == [r["label"] for r in rows]


def contract_of(path, mini_run, fmt):
    from covfeat.head.runs import Run

    sv = json.loads(path.read_text())
    run = Run(mini_run)
    assert sv["format"] == fmt and sv["threshold"]["raw"] == run.threshold
    assert sv["backbone"]["pretrained"] is False and "NOT PRETRAINED" in sv["warning"]
    assert sv["backbone"]["weights"]["kind"] == "none"
    assert sv["inputs"]["pixels"]["range"] == [0, 255] and sv["inputs"]["pixels"]["channel_order"] == "RGB"
    assert set(sv["outputs"]) == {"p_covid", "p_covid_raw", "covid", "threshold"}
    return sv


@pytest.mark.slow  # ~1 min: exports inception_v3 and loads it in a fresh interpreter
def test_savedmodel_runs_without_covfeat_as_predict_does(mini_run, images, pixels, predicted, tmp_path):
    out = tmp_path / "sm"
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--format", "savedmodel", "--out", str(out)])
    assert r.exit_code == 0, r.output
    sv = contract_of(out / "serving.json", mini_run, "savedmodel")
    assert sv["inputs"]["image_bytes"]["dtype"] == "string"
    assert json.loads((tmp_path / "model_card.json").read_text())["serving"] == sv
    from covfeat.use.predict import Predictor

    pr = Predictor(mini_run)
    weights = 4 * (pr.backbone.count_params() + pr.head.count_params())
    stored = sum(f.stat().st_size for f in (out / "variables").iterdir())
    assert stored < 1.1 * weights, (stored, weights)  # every weight once (tracking the models too stored them twice)
    got = serve("savedmodel", out, pixels, images, tmp_path)
    agree(got["pixels"], predicted, 1e-4)
    assert got["pixels"]["threshold"] == [sv["threshold"]["raw"]] * len(images)
    # The pixels the graph decodes from the files are covfeat's, within the bound measured for the sample.
    from covfeat.use.serving_decode import SAMPLE_BOUND

    assert np.abs(np.array(got["decoded"]) - pixels).max() <= SAMPLE_BOUND
    # With random weights the head's p_covid spreads over ~1e-4 here, so an absolute bound would
    # pass any decoding: the in-graph decoding's error must be a small share of that spread.
    raw = np.array([r["p_covid_raw"] for r in predicted])
    dp = np.abs(np.array(got["image_bytes"]["p_covid_raw"]) - raw).max()
    assert dp <= BYTES_SHARE * np.ptp(raw), (dp, np.ptp(raw))
    assert ["COVID-19" if c else "NORMAL" for c in got["image_bytes"]["covid"]] == [r["label"] for r in predicted]


@pytest.mark.slow  # ~1 min: tf2onnx on inception_v3
def test_onnx_runs_without_covfeat_as_predict_does(mini_run, images, pixels, predicted, tmp_path):
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    sv = contract_of(tmp_path / "serving.json", mini_run, "onnx")
    assert "ImageDecoder" in sv["image_bytes"] and sv["client_decoding"]
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temp file left
    agree(serve("onnx", out, pixels, images, tmp_path)["pixels"], predicted, 1e-4)


@pytest.mark.slow
def test_a_savedmodel_without_the_runs_scaling_disagrees_with_predict(mini_run, pixels, predicted, tmp_path,
                                                                      monkeypatch):
    """The comparison above catches a graph that skips the run's scaling."""
    import covfeat.use.export as ex

    monkeypatch.setattr(ex, "scale_graph", lambda sc, x: x)
    ex.export(mini_run, tmp_path / "sm", fmt="savedmodel")
    got = serve("savedmodel", tmp_path / "sm", pixels, [], tmp_path)["pixels"]
    with pytest.raises(AssertionError):
        agree(got, predicted, 1e-4)


def test_export_refuses_a_suffix_of_another_format(mini_run, tmp_path):
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--format", "onnx", "--out", str(tmp_path / "m.keras")])
    assert r.exit_code == 1
    assert r.stderr == (f"error: --out: expected a file name ending in .onnx, got '{tmp_path / 'm.keras'}' "
                        "(for that, --format keras).\n")
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--format", "savedmodel", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1
    assert r.stderr == (f"error: --out: --format savedmodel writes a folder, got the file name "
                        f"'{tmp_path / 'm.onnx'}' (for that, --format onnx).\n")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_savedmodel_folder_that_is_not_empty(mini_run, tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--format", "savedmodel", "--out", str(tmp_path / "sm")])
    assert r.exit_code == 1
    assert r.stderr == (f"error: --out: '{tmp_path / 'sm'}' exists and is not an empty folder; --format savedmodel "
                        "writes a new folder there.\n")
    assert [p.name for p in (tmp_path / "sm").iterdir()] == ["notes.txt"]


def test_a_model_card_is_overwritten_only_for_its_own_model_or_a_model_that_is_gone(tmp_path):
    from covfeat.use.export import check_neighbours

    (tmp_path / "a.keras").write_bytes(b"a model")
    (tmp_path / "model_card.json").write_text(json.dumps({"model": {"file": str(tmp_path / "a.keras")}}))
    check_neighbours(tmp_path / "a.keras")  # the same model, exported again
    with pytest.raises(ConfigError, match="describes the model a.keras in the same folder"):
        check_neighbours(tmp_path / "b.onnx")
    (tmp_path / "a.keras").unlink()
    check_neighbours(tmp_path / "b.onnx")  # its model is gone: nothing left to describe wrongly
    (tmp_path / "sm").mkdir()  # a SavedModel folder: its serving.json is inside it, only the card is shared
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"a model")
    (tmp_path / "model_card.json").write_text(json.dumps({"model": {"file": "sm"}}))  # as given: relative
    with pytest.raises(ConfigError, match=r"describes the model sm in the same folder; .* \(its model card would"):
        check_neighbours(tmp_path / "b.onnx")
    (tmp_path / "sm" / "saved_model.pb").unlink()
    check_neighbours(tmp_path / "b.onnx")  # an emptied folder is a model gone
    (tmp_path / "model_card.json").write_text("not json")
    with pytest.raises(ConfigError, match="is not a model card covfeat can read"):
        check_neighbours(tmp_path / "b.onnx")


def test_onnx_without_its_packages_says_what_to_install(mini_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import tf2onnx now raises ImportError
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1
    assert r.stderr == ("error: --format onnx needs the onnx and tf2onnx packages (tf2onnx is missing): "
                        "pip install 'covfeat[onnx]'.\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # builds the backbone
def test_a_converter_failure_is_one_line_with_the_versions_and_leaves_nothing(mini_run, tmp_path, monkeypatch):
    import onnx
    import tensorflow as tf
    import tf2onnx

    def fails(*args, output_path=None, **kwargs):
        open(output_path, "wb").write(b"half a model")
        raise ValueError("unsupported op Foo\nmore detail")

    monkeypatch.setattr(tf2onnx.convert, "from_function", fails)
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1
    assert r.stderr == (f"error: export: tf2onnx could not convert this model (backbone inception_v3, tensorflow "
                        f"{tf.__version__}, tf2onnx {tf2onnx.__version__}, onnx {onnx.__version__}): ValueError: "
                        "unsupported op Foo\n")
    assert list(tmp_path.iterdir()) == []
