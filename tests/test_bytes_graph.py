"""The backbone graph cache and the head-template cache are checked before they are trusted
(issue 18, item 8, and a killed graph build's leftover): a cache folder others can write is
refused, a cached graph holding an op the backbones never use is refused even when its
SHA-256 was rewritten to match, a template made for other settings is made again, a template
whose Keras file does not compute what the numpy head computes is not used, and the next run
sweeps the folder of a killed build."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import MINI_SPLIT
from typer.testing import CliRunner

import covfeat.head.template as template
from covfeat.cli import app
from covfeat.core.errors import RunError
from covfeat.core.fsutil import HOST, OWNER
from covfeat.extraction import graphfile
from covfeat.extraction.backbones import get_backbone, list_backbones, resolve_weights
from covfeat.extraction.graphops import ALLOWED_OPS, FORBIDDEN_OPS, unlisted
from covfeat.head.config import HeadConfig

runner = CliRunner()


def _extract_args(mini, tmp_path):
    return ["extract", "--backbone", "inception_v3", "--weights", "none", "--augment", "1",
            "--data", str(mini["cohen"]), "--data", str(mini["normal"]), "--cache-dir", str(tmp_path / "cache")]


@pytest.fixture
def graphs(mini_cache, graph_cache, tmp_path, monkeypatch):
    """A graph cache of this test's own holding the session's inception_v3 entry (made by
    mini_cache), so that no test here builds the backbone; returns (folder, entry)."""
    key = graphfile.graph_key(get_backbone("inception_v3"), resolve_weights(get_backbone("inception_v3"), "none"), 0)[0]
    folder = tmp_path / "graphs"
    folder.mkdir(mode=0o700)
    shutil.copytree(graph_cache / key, folder / key)
    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(folder))
    return folder, folder / key


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("where", ["group-writable", "other-writable", "ancestor", "symlink", "link-in-shared-folder", "owner"])
def test_a_graph_cache_others_can_change_is_refused(where, mini, graphs, tmp_path, monkeypatch):
    folder, _ = graphs
    if where == "group-writable":
        folder.chmod(0o770)
        want = f"error: the backbone graph cache {folder} is writable by its group (mode 0o770): they can make " \
               f"covfeat run what they write there; chmod go-w {folder}, or set COVFEAT_GRAPH_CACHE to a private folder."
    elif where == "other-writable":
        folder.chmod(0o707)
        want = f"is writable by all users (mode 0o707): they can make covfeat run what they write there; " \
               f"chmod go-w {folder}"
    elif where == "ancestor":  # whoever can write the parent can rename the cache away and plant another
        inner = folder / "inner"
        inner.mkdir(mode=0o700)
        for entry in list(folder.iterdir()):
            if entry != inner:
                entry.rename(inner / entry.name)
        monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(inner))
        folder.chmod(0o777)
        want = f"{inner} is inside {folder}, which is writable by its group and all users (mode 0o777)"
    elif where == "symlink":  # a private-looking name for a folder others can write: checked where it leads
        (tmp_path / "mine").symlink_to(folder)
        monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "mine"))
        folder.chmod(0o775)
        want = f"error: the backbone graph cache {folder} is writable by its group (mode 0o775)"
    elif where == "link-in-shared-folder":  # a private folder, named by a link that others can replace
        (tmp_path / "shared").mkdir(mode=0o777)
        (tmp_path / "shared").chmod(0o777)
        (tmp_path / "shared" / "graphs").symlink_to(folder)
        monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "shared" / "graphs"))
        want = f"{tmp_path / 'shared' / 'graphs'} is inside {tmp_path / 'shared'}, which is writable by its group " \
               "and all users (mode 0o777)"
    else:
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(folder, 4321, 4321)
        want = f"{folder} is owned by uid 4321, not by you: its owner can make covfeat run what they write there; " \
               "set COVFEAT_GRAPH_CACHE to a folder of your own."
    r = runner.invoke(app, _extract_args(mini, tmp_path))
    assert r.exit_code == 1
    assert want in _one_error_line(r.stderr)
    assert not list((tmp_path / "cache").glob("*.h5"))


def test_a_sticky_world_writable_ancestor_is_accepted_and_new_folders_are_private(mini, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: no one may rename or delete what another put in it
    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(shared / "me" / "graphs"))
    from covfeat.core.fsutil import private_dir

    made = private_dir(shared / "me" / "graphs", "backbone graph cache", "COVFEAT_GRAPH_CACHE")
    assert made == shared / "me" / "graphs"
    assert [oct(p.stat().st_mode & 0o777) for p in (made.parent, made)] == ["0o700", "0o700"]


def _write_file_graph(entry, target):
    """The entry's graph with a WriteFile node that runs on every call, and its SHA-256 and the
    layout's checksum rewritten to match, as anyone who can write the folder could."""
    from tensorflow.core.framework import function_pb2

    fdef = function_pb2.FunctionDef()
    fdef.ParseFromString((entry / graphfile.GRAPH).read_bytes())
    for name, value in (("pwn_name", str(target).encode()), ("pwn_data", b"written by the cached graph")):
        node = fdef.node_def.add(name=name, op="Const")
        node.attr["dtype"].type = 7  # DT_STRING
        node.attr["value"].tensor.dtype = 7
        node.attr["value"].tensor.string_val.append(value)
    fdef.node_def.add(name="pwn", op="WriteFile", input=["pwn_name:output:0", "pwn_data:output:0"])
    fdef.signature.control_output.append("pwn")
    fdef.control_ret["pwn"] = "pwn"
    graph = fdef.SerializeToString(deterministic=True)
    (entry / graphfile.GRAPH).write_bytes(graph)
    layout = json.loads((entry / graphfile.LAYOUT).read_text())
    layout["graph_sha256"] = graphfile.sha256_bytes(graph)
    layout["layout_sha256"] = graphfile._layout_digest(layout)
    (entry / graphfile.LAYOUT).write_text(json.dumps(layout, indent=1))


def test_a_cached_graph_with_a_file_op_is_refused_not_run(mini, graphs, tmp_path):
    _, entry = graphs
    target = tmp_path / "victim.txt"
    _write_file_graph(entry, target)
    r = runner.invoke(app, _extract_args(mini, tmp_path))
    assert r.exit_code == 1
    assert _one_error_line(r.stderr) == (
        f"error: the cached backbone graph {entry / graphfile.GRAPH} holds op WriteFile (a file, Python or "
        f"function-call op): someone wrote into your graph cache, so it is not run; delete {entry} and check who "
        "can write that folder.")
    assert not target.exists()
    assert (entry / graphfile.GRAPH).exists()  # refused, not silently replaced: the user should see it


def test_the_smallest_backbone_traces_to_allowed_ops_only():
    import tensorflow as tf

    from covfeat.extraction.backbones import build_backbone

    bb = get_backbone("inception_v3")
    model = build_backbone(bb, resolve_weights(bb, "none"), seed=0)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, 224, 224, 3])])
    fdef = fn.get_concrete_function().function_def
    assert {n.op for n in fdef.node_def} <= ALLOWED_OPS
    assert unlisted(fdef) is None


@pytest.mark.slow
@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_traces_to_allowed_ops_only(name):
    import tensorflow as tf

    from covfeat.extraction.backbones import build_backbone

    bb = get_backbone(name)
    model = build_backbone(bb, resolve_weights(bb, "none"), seed=0)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, 224, 224, 3])])
    assert unlisted(fn.get_concrete_function().function_def) is None


def test_the_forbidden_ops_are_real_tensorflow_ops_and_never_allowed():
    from tensorflow.python.framework import op_def_registry

    assert not FORBIDDEN_OPS & ALLOWED_OPS
    assert [op for op in sorted(FORBIDDEN_OPS) if op_def_registry.get(op) is None] == []
    assert [op for op in sorted(ALLOWED_OPS) if op_def_registry.get(op) is None] == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_the_next_run_sweeps_a_killed_builds_folder(mini, graphs, tmp_path):
    folder, entry = graphs
    dead = folder / f".{entry.name}.{HOST}.{_dead_pid()}.0badc0de.tmp"  # fsutil.temp_path's name, its pid gone
    dead.mkdir()
    (dead / OWNER).write_text(f"{HOST} 0")
    (dead / graphfile.WEIGHTS).write_bytes(b"\0" * 1_000_000)  # half a build
    live = folder / f".other.{HOST}.{os.getpid()}.0badcafe.tmp"  # a build still under way: left alone
    live.mkdir()
    r = runner.invoke(app, _extract_args(mini, tmp_path))
    assert r.exit_code == 0, r.output
    assert not dead.exists()
    assert live.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted([entry.name, live.name])


def _fit_head(mini_cache, tmp_path, runs):
    return runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--runs-dir", str(tmp_path / runs),
                               "--epochs", "2", "--val", str(MINI_SPLIT["val"]), "--test", str(MINI_SPLIT["test"])])


def test_a_template_recorded_for_other_settings_is_made_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COVFEAT_HEAD_CACHE", str(tmp_path / "templates"))
    shape, cfg = (3, 3, 40), HeadConfig(dropout=0.3, seed=4, dense_units=24)
    first = template.head_template(shape, cfg)
    layout = json.loads((first.folder / template.LAYOUT).read_text())
    layout["what"]["head"]["dropout"] = 0.9  # and its checksum made to match, as a writer of the folder could
    layout["layout_sha256"] = template._layout_digest(layout)
    (first.folder / template.LAYOUT).write_text(json.dumps(layout))
    capsys.readouterr()
    again = template.head_template(shape, cfg)
    assert capsys.readouterr().err == (f"note: the head template {first.folder} is unusable (made for other settings: "
                                       "head.dropout is 0.9 in it, 0.3 in this run); making it again with Keras.\n")
    assert json.loads((again.folder / template.LAYOUT).read_text())["what"]["head"]["dropout"] == 0.3
    for mine, theirs in zip(again.initial_weights(), first.initial_weights()):
        assert np.array_equal(mine, theirs)


def test_a_template_that_computes_otherwise_is_not_used(tmp_path, monkeypatch):
    """A Keras whose file layout the marker search misreads (here gamma and beta, of the same
    shape, swapped) gives a head.keras that loads but computes another head: refused once, at
    creation, and nothing is kept."""
    monkeypatch.setenv("COVFEAT_HEAD_CACHE", str(tmp_path / "templates"))
    real = template.locate_weights

    def misread(*a):
        found = real(*a)
        found[2], found[3] = found[3], found[2]
        return found

    monkeypatch.setattr(template, "locate_weights", misread)
    with pytest.raises(RunError, match=r"^the head template Keras .* made does not compute what covfeat's head "
                       r"computes \(probabilities differ by up to .* on 4 rows\), so it is not used; run fit-head "
                       r"with --engine tf"):
        template.head_template((3, 3, 40), HeadConfig(dropout=0.3, seed=4, dense_units=24))
    assert list((tmp_path / "templates").iterdir()) == []


def test_a_template_checks_out_against_the_numpy_head(tmp_path, monkeypatch):
    monkeypatch.setenv("COVFEAT_HEAD_CACHE", str(tmp_path / "templates"))
    tmpl = template.head_template((3, 3, 40), HeadConfig(dropout=0.3, seed=4, dense_units=24))
    layout = json.loads((tmpl.folder / template.LAYOUT).read_text())
    assert layout["checked"]["rows"] == 4 and 0 <= layout["checked"]["max_abs_diff"] <= template.CHECK_ATOL
    assert np.isfinite(layout["checked"]["max_abs_diff"])


def test_a_group_writable_template_cache_is_refused(mini_cache, tmp_path, monkeypatch):
    (tmp_path / "templates").mkdir(mode=0o770)
    (tmp_path / "templates").chmod(0o770)
    monkeypatch.setenv("COVFEAT_HEAD_CACHE", str(tmp_path / "templates"))
    r = _fit_head(mini_cache, tmp_path, "a")
    assert r.exit_code == 1
    assert _one_error_line(r.stderr) == (
        f"error: the head-template cache {tmp_path / 'templates'} is writable by its group (mode 0o770): they can "
        f"make covfeat run what they write there; chmod go-w {tmp_path / 'templates'}, or set COVFEAT_HEAD_CACHE "
        "to a private folder.")


def test_a_traced_graph_outside_the_allow_list_is_not_kept(tmp_path, monkeypatch, capsys):
    """A TensorFlow that traces to an op the list lacks: a note and Keras each run, not an entry
    that every later run would refuse."""
    from test_backbones import _tiny_build

    import covfeat.extraction.graphops as graphops
    from covfeat.extraction.backbones import Backbone, Scaling

    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "graphs"))
    monkeypatch.setattr(graphops, "ALLOWED_OPS", graphops.ALLOWED_OPS - {"Conv2D"})
    bb = Backbone("tiny", _tiny_build, Scaling("tiny", 255.0), (7, 7, 8), 0.3)
    assert graphfile.backbone_forward(bb, resolve_weights(bb, "none"), seed=0).source == "keras"
    assert ("note: the traced graph of tiny is not kept (it holds op Conv2D (not an op of covfeat's backbones), "
            "outside covfeat.extraction.graphops.ALLOWED_OPS); every extraction builds it with Keras.") \
        in capsys.readouterr().err
    assert list((tmp_path / "graphs").iterdir()) == []
