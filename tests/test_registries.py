"""Extension points are registries: a new backbone, data layout or audit probe is one
registration, used end to end through the public path with no other edit."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.core.errors import ConfigError, DataError
from covfeat.core.registry import Registry
from covfeat.extraction.backbones import REGISTRY, Backbone, Scaling, list_backbones
from covfeat.extraction.sources import (
    LAYOUTS,
    Layout,
    Record,
    describe_layouts,
    detect_layout,
    load_sources,
    parse_label,
)
from covfeat.probes.audit import audit, summary
from covfeat.probes.probe import PROBES, Probe, describe_probes

runner = CliRunner()


def _tiny_build(input_shape):
    import keras

    inp = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 8, strides=8, activation="relu")(inp)  # 28 x 28
    return keras.Model(inp, keras.layers.AveragePooling2D(4)(x), name="fake_tiny")  # 7 x 7 x 4


def _labels_txt_load(src, m, views):
    """A folder with a ``labels.txt`` of ``file label patient`` lines (a made-up layout)."""
    out = []
    for line in (src / "labels.txt").read_text().splitlines():
        name, label, patient = line.split()
        out.append(Record(str(src / name), parse_label(label), f"{src.name}:{patient}", src.name))
    return out


@pytest.fixture
def fake_backbone():
    yield REGISTRY.register(Backbone("fake_tiny", _tiny_build, Scaling("fake", 255.0), (7, 7, 4), 0.3))
    REGISTRY.unregister("fake_tiny")


@pytest.fixture
def fake_layout():
    yield LAYOUTS.register(Layout("labels_txt", lambda src: src.is_dir() and (src / "labels.txt").is_file(),
                                  _labels_txt_load, "labels.txt folder", "a folder with a labels.txt"))
    LAYOUTS.unregister("labels_txt")


@pytest.fixture
def fake_probe():
    def run(a):
        n = int(a.fc.has_features().sum())
        return {"status": "not flagged", "verdict": f"not flagged: the fake probe saw {n} images of {a.fc.backbone}."}

    yield PROBES.register(Probe("fake", run))
    PROBES.unregister("fake")


@pytest.fixture
def labels_folder(tmp_path, mini):
    """Three COVID-19 and three NORMAL radiographs of the mini set, listed in labels.txt."""
    src = tmp_path / "listed"
    src.mkdir()
    lines = []
    for folder, label in ((mini["cohen"] / "images", "COVID-19"), (mini["normal"], "NORMAL")):
        for i, p in enumerate(sorted(folder.iterdir())[:3]):
            shutil.copy(p, src / p.name)
            lines.append(f"{p.name} {label} {label[0]}{i}")
    (src / "labels.txt").write_text("\n".join(lines) + "\n")
    return src


def test_a_registry_keeps_order_and_names_what_it_knows():
    reg = Registry("widget", option="--widget")
    a = reg.register(Backbone("a", None, None, (1, 1, 1), 0.0))
    b = reg.register(Backbone("b", None, None, (1, 1, 1), 0.0))
    assert reg.names() == list(reg) == ["a", "b"] and reg.values() == [a, b] and "a" in reg and len(reg) == 2
    with pytest.raises(ConfigError, match=r"^A widget named 'a' is already registered\.$"):
        reg.register(a)
    with pytest.raises(ConfigError, match=r"^--widget: expected a registered widget, one of a, b; got 'c'\.$"):
        reg.get("c")
    assert reg.get("c", None) is None
    assert reg.unregister("a") is a and reg.names() == ["b"]


def test_a_backbone_added_by_one_registration_is_listed_checked_and_shaped(fake_backbone):
    from covfeat.extraction.backbones import build_backbone, resolve_weights
    from covfeat.extraction.config import ExtractConfig

    assert list_backbones()[-1] == "fake_tiny"
    assert ExtractConfig(backbone="fake_tiny", weights="none").backbone == "fake_tiny"
    model = build_backbone(fake_backbone, resolve_weights(fake_backbone, "none"), seed=0)  # checks the shape
    assert tuple(model(np.zeros((1, 224, 224, 3), np.float32), training=False).shape[1:]) == (7, 7, 4)


def test_a_layout_added_by_one_registration_is_detected_loaded_and_described(fake_layout, labels_folder, tmp_path):
    assert detect_layout(labels_folder) == "labels_txt"
    m = load_sources([labels_folder])
    assert m.counts() == {"COVID-19": 3, "NORMAL": 3}
    assert {r.patient_id for r in m.records} == {"listed:C0", "listed:C1", "listed:C2", "listed:N0", "listed:N1",
                                                 "listed:N2"}
    assert describe_layouts() == "Cohen folder, Kermany folder, class folders, manifest CSV or labels.txt folder"
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match=r"not a known layout\. Expected .*, a manifest CSV, or a folder with a "
                                        r"labels\.txt\.$"):
        load_sources([tmp_path / "stuff"])


def test_a_new_layout_and_backbone_run_through_extract(fake_backbone, fake_layout, labels_folder):
    r = runner.invoke(app, ["extract", "--backbone", "fake_tiny", "--weights", "none", "--augment", "0",
                            "--data", str(labels_folder)])
    assert r.exit_code == 0, r.output
    assert "Data: 6 images (3 COVID-19, 3 NORMAL)" in r.output
    assert "fake_tiny-none-" in r.stdout.strip().splitlines()[-1]


@pytest.fixture
def cli_with_fake_layout(fake_layout):
    """covfeat.cli loaded while the fake layout is registered (its --data help is made at load),
    and loaded again after the layout is gone, so later tests see the real help."""
    import importlib

    import covfeat.cli

    yield importlib.reload(covfeat.cli)
    LAYOUTS.unregister("labels_txt")
    importlib.reload(covfeat.cli)
    LAYOUTS.register(fake_layout)  # for fake_layout's own teardown


def test_the_data_help_names_the_registered_layouts(cli_with_fake_layout):
    helped = runner.invoke(cli_with_fake_layout.app, ["extract", "--help"], env={"COLUMNS": "200"}).stdout
    assert "manifest CSV or labels.txt folder" in " ".join(helped.split())


def test_registrations_are_undone_by_their_fixtures():
    assert "fake_tiny" not in REGISTRY and "labels_txt" not in LAYOUTS and "fake" not in PROBES
    assert describe_layouts() == "Cohen folder, Kermany folder, class folders or manifest CSV"
    assert describe_probes() == ("metadata, control, occlusion and source probes; with --lungs, the lung fields "
                                 "blanked, only the lungs kept and Grad-CAM's in-lung share; with --external, external "
                                 "validation")


def test_a_probe_added_by_one_registration_runs_and_is_reported(fake_probe, mini_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mini_run, run)  # the audit writes into the run; the session's run stays as it is
    assert describe_probes() == ("metadata, control, occlusion, source and fake probes; with --lungs, the lung fields "
                                 "blanked, only the lungs kept and Grad-CAM's in-lung share; with --external, external "
                                 "validation")
    helped = runner.invoke(app, ["audit", "--help"], env={"COLUMNS": "200"}).stdout
    assert "Shortcut audit: metadata, control, occlusion, source and fake probes" in helped  # the CLI reads the registry
    res = audit(run, probes=("metadata", "fake"), cache_dir=tmp_path / "cache", progress=False)
    assert list(res) == ["pretrained", "weights", "metadata", "fake"]
    assert res["fake"]["verdict"] == "not flagged: the fake probe saw 16 images of inception_v3."
    assert summary(res).splitlines()[-1] == "fake probe: not flagged: the fake probe saw 16 images of inception_v3."
    out = runner.invoke(app, ["report", str(run)]).stdout
    assert "audit of run, fake probe: not flagged: the fake probe saw 16 images" in out
    assert "audit: fake probe" in out


def test_the_audit_refuses_probes_it_does_not_run():
    with pytest.raises(ConfigError, match=r"^probes: expected audit probes among metadata, control, occlusion, "
                                          r"source; got 'lungs'\.$"):
        audit("no-such-run", probes=("lungs",))
    with pytest.raises(ConfigError, match=r"got 'external' \(it runs when its own input is given\)\.$"):
        audit("no-such-run", probes=("external",))
