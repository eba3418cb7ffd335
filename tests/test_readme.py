"""The README's promises a newcomer copies: its Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_example_runs_as_written(tmp_path, capsys):
    block = re.search(r"## From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "NOT PRETRAINED" in out and "COVID-19 precision" in out
    assert (tmp_path / "sweep-report" / "table2.md").is_file()
    assert len(list((tmp_path / "runs").iterdir())) == 3
