"""The paper's published Table 2 and the test counts it rests on (packaged data)."""

from __future__ import annotations

import json
from importlib import resources

from covfeat.trust.metrics import METRIC_ROWS, TABLE2_KEYS

# The published cells, then the test counts they rest on.
CELLS = [(label, key) for label, key in METRIC_ROWS if key in TABLE2_KEYS or key in ("n_covid", "n_normal")]


PAPER_TEST_COUNTS = {"n_covid": 42, "n_normal": 282}


def paper_table2() -> dict:
    """The published Table 2 (packaged data)."""
    return json.loads(resources.files("covfeat").joinpath("data/paper_table2.json").read_text())
