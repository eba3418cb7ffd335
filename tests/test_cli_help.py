"""The command line is made from the settings' declarations: every flagged field is an option
with its declared help and default, a new HeadConfig field is a fit-head flag and a
config-file key with no edit of cli.py, and the help reads as it did before."""

import importlib
import re
from dataclasses import MISSING, fields, make_dataclass
from pathlib import Path

import pytest
from rich.text import Text
from typer.testing import CliRunner

import covfeat.cli as cli
import covfeat.head.config as head_config
from covfeat.core.settings import default_of, flagged, help_text, number, option_name, setting, shown_default
from covfeat.extraction.config import DriverConfig, ExtractConfig
from covfeat.head.config import FitConfig, HeadConfig, file_keys, fit_config

runner = CliRunner()
SNAPSHOT = Path(__file__).parent / "data" / "cli_help.txt"
COMMANDS = ["", "extract", "fit-head", "report", "predict", "export", "reproduce", "audit", "explain", "info", "verify",
            "clean"]


def _help(app, command: str) -> str:
    r = runner.invoke(app, ([command] if command else []) + ["--help"], prog_name="python -m covfeat.cli",
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output


def _rows(text: str) -> dict[str, str]:
    """An option table's rows by their long flag, whitespace and borders dropped."""
    rows = {}
    for line in text.splitlines():
        words = line.replace("│", " ").split()
        if words[:1] == ["*"]:
            words = words[1:]
        if words and words[0].startswith("--"):
            rows[words[0]] = " ".join(words)
    return rows


def _shown(text: str) -> str:
    """A help text as rich shows it (its markup read, as typer reads it)."""
    return " ".join(Text.from_markup(text).plain.split())


def test_help_is_as_it_was():
    """Every command's help, whitespace normalised, against the help from before it was derived."""
    want = re.split(r"^=== ?(.*)$", SNAPSHOT.read_text(), flags=re.M)[1:]
    want = {want[i].strip(): want[i + 1] for i in range(0, len(want), 2)}
    assert sorted(want) == sorted(COMMANDS)
    for c in COMMANDS:
        assert " ".join(_help(cli.app, c).split()) == " ".join(want[c].split()), c


@pytest.mark.parametrize("cls", [ExtractConfig, DriverConfig])
def test_every_extract_setting_is_an_option_with_its_help_and_default(cls):
    rows = _rows(_help(cli.app, "extract"))
    for _, _, f in flagged(cls):
        row = rows[f.metadata["flag"]]
        assert _shown(help_text(f)) in row, f.name
        default = default_of(f)
        conv = cli.EXTRACT_CONVERSIONS.get(option_name(f))
        default = conv.default(default) if conv else default
        if default is MISSING:
            assert row.endswith("[required]"), f.name
        elif isinstance(default, bool):
            assert row.endswith(f"[default: {'' if default else 'no-'}{option_name(f).replace('_', '-')}]"), f.name
        elif default is not None:
            assert row.endswith(f"[default: {default}]"), f.name


def test_every_fit_setting_is_an_option_with_its_help_and_default():
    rows = _rows(_help(cli.app, "fit-head"))
    for _, _, f in flagged(FitConfig):
        row = rows[f.metadata["flag"]]
        shown = shown_default(f)
        assert row.endswith(" ".join(t for t in (_shown(help_text(f)), shown and f"[default: {shown}]") if t)), f.name


def test_every_head_field_is_a_flag_and_a_key_of_its_own_name():
    keys = file_keys()
    for f in fields(HeadConfig):
        assert f.metadata.get("flag") and option_name(f) == f.name, f.name
        assert keys[f.name] == (("head",), f)


@pytest.fixture
def new_head_field(monkeypatch):
    """HeadConfig with one more field, as a contributor would add it, and the command line
    made again from the declarations (cli.py unchanged); restored afterwards."""
    head = make_dataclass("HeadConfig", [("label_smoothing", float, setting(
        0.0, number(0, 1, hi_open=True), flag="--label-smoothing", help="Label smoothing of the loss"))],
        bases=(HeadConfig,), frozen=True)
    fit = make_dataclass("FitConfig", [("head", head, setting(factory=head, nested=True))], bases=(FitConfig,),
                         frozen=True)
    monkeypatch.setattr(head_config, "HeadConfig", head)
    monkeypatch.setattr(head_config, "FitConfig", fit)
    yield importlib.reload(cli)
    monkeypatch.undo()
    importlib.reload(cli)


def test_a_new_head_field_is_a_fit_head_flag_and_a_config_file_key(new_head_field, tmp_path):
    app = new_head_field.app
    row = _rows(_help(app, "fit-head"))["--label-smoothing"]
    assert row == "--label-smoothing <float> Label smoothing of the loss [default: 0]"
    f = tmp_path / "sweep.toml"
    f.write_text("label_smoothing = 0.2\nepochs = 3\n")
    assert fit_config(f).head.label_smoothing == 0.2 and fit_config(f, label_smoothing=0.1).head.label_smoothing == 0.1
    r = runner.invoke(app, ["fit-head", "--cache-dir", str(tmp_path / "c"), "--label-smoothing", "1"])
    assert r.exit_code == 1
    assert r.stderr == "error: --label-smoothing: expected a number in [0, 1), got 1.0.\n"
    f.write_text("label_smoothing = -1\n")
    r = runner.invoke(app, ["fit-head", "--cache-dir", str(tmp_path / "c"), "--config", str(f)])
    assert r.stderr == f"error: {f}: label_smoothing: expected a number in [0, 1), got -1.\n"
