"""The install ends with one TensorFlow, on a CPU machine and on a GPU node (issue 20, item 4).

`tensorflow` and `tensorflow-cpu` (or -intel, -macos...) are separate distributions that
write the same `tensorflow/` package: with two installed, uninstalling either breaks the
other. pip's resolver, run dry, says what each documented install command would install.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every distribution that installs the top-level `tensorflow` package.
TENSORFLOWS = re.compile(r"^(tensorflow(-cpu|-gpu|-intel|-macos|-cpu-aws|-aarch64)?|intel-tensorflow|tf-nightly.*)$")


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.slow  # needs the package index; about 2-3 minutes per command
@pytest.mark.parametrize("target", [".[gpu]", ".", ".[test,ray]"])
def test_each_install_command_resolves_to_exactly_one_tensorflow(target, tmp_path):
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "-e", target], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = {canonical(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert sorted(n for n in names if TENSORFLOWS.match(n)) == ["tensorflow"]
    cuda = sorted(n for n in names if n.startswith("nvidia-"))
    if target == ".[gpu]":  # the same distribution, with its CUDA libraries
        assert "nvidia-cudnn-cu12" in cuda and "nvidia-cublas-cu12" in cuda, cuda
    else:
        assert cuda == []


def test_importing_tensorflow_says_nothing_on_a_machine_without_a_gpu():
    """The Linux `tensorflow` wheel is a CUDA build: without a CUDA driver it prints "Could not
    find cuda drivers" at import and "failed call to cuInit" at the first device query, which
    would add lines to every one-line `error: ...` of a command that imported it."""
    code = ("from covfeat.core.quiet import import_tensorflow; import_tensorflow()\n"
            "import tensorflow as tf; tf.config.list_logical_devices('GPU'); print(tf.constant(1.0).numpy())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "1.0\n", r.stderr
    assert r.stderr == ""
