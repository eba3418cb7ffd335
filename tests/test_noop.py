"""A no-op costs nothing: the commands that only read a cache (a re-run `extract` on a complete
cache, `info`, `verify`, `clean`) never import TensorFlow or Keras, whose import is seconds of a
second's work (covfeat issue 20, item 3).  fit-head on a warm head template is held to the same
rule in tests/test_headfile.py.

Each check runs the real command line in a fresh interpreter, with nothing imported ahead."""

import json
import os
import subprocess
import sys

import pytest
from conftest import make_mini

HEAVY = ("tensorflow", "keras")

# Runs covfeat's CLI once per argument list, in one process, and records after each command its
# exit code and which of the watched modules (HEAVY unless told) are imported by then.
RUN_COMMANDS = """
import json, sys
from covfeat.cli import app
out, done = sys.argv[1], []
for args in json.loads(sys.argv[2]):
    try:
        app(args=args, prog_name="covfeat")
        code = 0
    except SystemExit as e:
        code = e.code
    done.append({"args": args, "code": code, "imported": [m for m in sys.argv[3].split(",") if m in sys.modules]})
open(out, "w").write(json.dumps(done))
"""


def _run(commands: list[list[str]], tmp_path, watch=HEAVY):
    out = tmp_path / "imported.json"
    r = subprocess.run([sys.executable, "-c", RUN_COMMANDS, str(out), json.dumps(commands), ",".join(watch)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and out.exists(), r.stderr
    return json.loads(out.read_text()), r


def test_read_only_commands_and_a_no_op_extract_import_neither_tensorflow_nor_keras(mini, mini_cache, tmp_path):
    cache_dir = mini_cache.parent
    commands = [
        ["extract", "-b", "inception_v3", "--weights", "none", "--augment", "2", "-d", str(mini["cohen"]),
         "-d", str(mini["normal"]), "--cache-dir", str(cache_dir)],
        ["info", str(mini_cache)],
        ["verify", str(mini_cache)],
        ["clean", "--cache-dir", str(cache_dir), "--runs-dir", str(tmp_path / "runs")],
    ]
    done, r = _run(commands, tmp_path)
    assert [d["code"] for d in done] == [0, 0, 0, 0], r.stderr
    assert "Cache is complete and verified; nothing to do" in r.stderr  # the extract was the no-op it should be
    assert r.stdout.splitlines()[0] == str(mini_cache)
    assert [(d["args"][0], d["imported"]) for d in done] == [(c[0], []) for c in commands]


def test_info_verify_and_clean_do_not_import_numba(mini_cache, tmp_path):
    """Importing numba costs about half a second, more than `info` on a small cache should take
    in all; no kernel runs on these paths, so numba is imported only when a kernel is first
    called (covfeat.core.lazyjit).  It once came in with the near-duplicate index (through the
    cache key's fingerprint version) and with the reader."""
    commands = [["info", str(mini_cache)], ["verify", str(mini_cache)],
                ["clean", "--cache-dir", str(mini_cache.parent), "--runs-dir", str(tmp_path / "runs")]]
    done, r = _run(commands, tmp_path, watch=("numba", *HEAVY))
    assert [d["code"] for d in done] == [0, 0, 0], r.stderr
    assert [(d["args"][0], d["imported"]) for d in done] == [(c[0], []) for c in commands]


WEIGHTS = """
import dataclasses, hashlib, json, os, sys
from pathlib import Path
from covfeat.extraction.backbones import get_backbone, keras_cache_dir, resolve_weights
bb = get_backbone("inception_v3")
target = keras_cache_dir() / bb.imagenet.file
target.parent.mkdir(parents=True)
target.write_bytes(b"weights Keras would have downloaded")
md5 = hashlib.md5(target.read_bytes()).hexdigest()
cached = resolve_weights(dataclasses.replace(bb, imagenet=dataclasses.replace(bb.imagenet, md5=md5)), "imagenet")
own = resolve_weights(bb, str(target))
print(json.dumps({"cached": [cached.kind, cached.path, cached.identity], "file": [own.kind, own.identity],
                  "imported": [m for m in ("tensorflow", "keras") if m in sys.modules]}))
"""


def test_imagenet_weights_found_in_kerass_cache_and_a_weights_file_resolve_without_keras(tmp_path):
    """The identities of --weights imagenet (a file already in Keras's cache, checked against its
    published hash) and --weights FILE are read without importing Keras; the file is where
    Keras's get_file would look ($KERAS_HOME/models)."""
    import hashlib

    home = tmp_path / "keras_home"
    env = dict(os.environ, KERAS_HOME=str(home))
    r = subprocess.run([sys.executable, "-c", WEIGHTS], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    target = home / "models" / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    md5 = hashlib.md5(target.read_bytes()).hexdigest()
    assert got["cached"] == ["imagenet", str(target), f"imagenet:md5={md5}"]
    assert got["file"] == ["file", f"file:sha256={hashlib.sha256(target.read_bytes()).hexdigest()}"]
    assert got["imported"] == []


@pytest.mark.slow
def test_an_extraction_that_builds_its_model_still_starts_quietly(tmp_path):
    """extract no longer imports TensorFlow up front (clikit.guard's quiet import): the model
    build imports it itself, and TensorFlow's start-up notices must stay hidden there too.
    Slow: a real forward pass (about 20 s)."""
    d = make_mini(tmp_path / "d", n_covid=2, n_normal=2)
    env = dict(os.environ, COVFEAT_NO_PROGRESS="1")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    r = subprocess.run([sys.executable, "-m", "covfeat.cli", "extract", "-b", "inception_v3", "--weights", "none",
                        "--augment", "0", "-d", str(d["cohen"]), "-d", str(d["normal"]), "--cache-dir",
                        str(tmp_path / "c")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "oneDNN" not in r.stderr and "absl" not in r.stderr and "cpu_feature_guard" not in r.stderr
    assert r.stderr.splitlines()[0].startswith("Data: ")


PLAN_WITH_LUNGS = """
import json, sys
from covfeat.extraction.config import ExtractConfig, LungsConfig
from covfeat.extraction.plan import plan
lungs, cohen, normal, cache_dir = sys.argv[1:]
cfg = ExtractConfig(backbone="inception_v3", weights="none", lungs=LungsConfig(model=lungs, outside="blank"))
p = plan([cohen, normal], cfg, cache_dir)
print(json.dumps({"lungs": p.pipeline.lungs_hashes, "target": str(p.target),
                  "imported": [m for m in ("tensorflow", "keras") if m in sys.modules]}))
"""


def test_a_plan_with_a_lungs_model_reads_its_files_without_keras(tiny_lungs, mini, tmp_path):
    """The lungs model's folder is read and its hash checked at plan time (it enters the key);
    Keras builds its network only when an image is first restricted to the lungs, which a
    complete cache never needs."""
    r = subprocess.run([sys.executable, "-c", PLAN_WITH_LUNGS, str(tiny_lungs), str(mini["cohen"]),
                        str(mini["normal"]), str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert list(got["lungs"]) == [str(tiny_lungs)] and got["target"].startswith(str(tmp_path / "c"))
    assert got["imported"] == []
