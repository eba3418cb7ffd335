"""What an audit probe is: :class:`Probe` entries in :data:`PROBES`, and the inputs they share.

A probe module defines its probe and registers it where it defines it; the package's
``__init__`` imports every probe module, in the order the audit runs them, and
:func:`covfeat.probes.audit.audit` runs whatever is registered.  A new probe is one
``PROBES.register(Probe(...))``: it is run by default, kept in ``audit.json`` under its
name, and shown by ``covfeat audit`` and ``covfeat report`` with no other edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from covfeat.core.registry import Registry
from covfeat.extraction.config import OcclusionConfig
from covfeat.head.config import FitConfig
from covfeat.head.runs import Run
from covfeat.store.reader import FeatureCache
from covfeat.trust.intervals import MARGIN


@dataclass(frozen=True)
class AuditInputs:
    """Everything a probe may use: the finished run, its cache (``fc``), its stage-two config,
    where probes that extract again keep their caches, and the audit's own options (``margin``:
    the AUC difference the three-way verdicts treat as negligible; ``lungs``: a lungs model
    folder, ``--lungs``, whose predicted lung fields the lungs probes blank or keep)."""

    run: Run
    fc: FeatureCache
    fit: FitConfig
    cache_dir: str | Path
    progress: bool
    occlusion: OcclusionConfig
    external: list | None = None
    keep_overlap: bool = False
    margin: float = MARGIN
    lungs: str | None = None

    @property
    def seed(self) -> int:
        """The run's head seed, which the probes' own cross-validation and bootstrap use too."""
        return self.fit.head.seed


@dataclass(frozen=True)
class Probe:
    """One audit probe.

    ``run(inputs)`` returns its result: a JSON-ready dict with at least ``status`` (FLAGGED,
    CLEAR or INCONCLUSIVE) and ``verdict`` (one paragraph a reader can act on), which
    ``audit.json`` keeps under ``name``.  ``help`` names it in the command's help (default:
    its name).  ``on_request``, when set, makes it run exactly when it says the audit asked
    for it (the external probe: when other sources are given), never by default.  ``part_of``
    names the probe it belongs with (the lungs probes: ``occlusion``): it runs only when that
    one runs and its ``on_request`` says so, and the help describes it with that probe.

    A probe that compares two models on the same rows puts the comparison under ``paired``
    (see :func:`covfeat.probes.common.paired`).  Once every probe has run, the audit adjusts
    the p-values of all of them together (Holm) and calls ``finish(result)``, which reads the
    verdict again with ``paired["p_holm"]``: a difference one probe would call shown alone may
    not survive the family.
    """

    name: str
    run: Callable[[AuditInputs], dict]
    help: str = ""
    on_request: Callable[[AuditInputs], bool] | None = None
    finish: Callable[[dict], dict] | None = None
    part_of: str | None = None


PROBES: Registry[Probe] = Registry("audit probe")


def default_probes() -> list[str]:
    """Names of the probes an audit runs unless told otherwise, in their order."""
    return [p.name for p in PROBES.values() if p.on_request is None]


def describe_probes() -> str:
    """The registered probes in a few words, for the audit command's help: ``metadata, control,
    occlusion and source probes; with --external, external validation; with --lungs, the lung
    fields blanked, only the lungs kept and Grad-CAM's in-lung share`` (probes run on request
    are grouped by the option that asks for them, read from their help's ``(with --X)``)."""
    names = [PROBES[n].help or n for n in default_probes()]
    text = _and(names) + " probes"
    asked: dict[str, list[str]] = {}
    for p in PROBES.values():
        if p.on_request is not None:
            said = p.help or p.name
            flag, _, what = said.partition(") ") if said.startswith("(with ") else ("", "", said)
            asked.setdefault(flag.lstrip("("), []).append(what)
    return text + "".join(f"; {flag}, {_and(whats)}" if flag else f"; {_and(whats)}" for flag, whats in asked.items())


def _and(words: list[str]) -> str:
    return (", ".join(words[:-1]) + " and " if len(words) > 1 else "") + (words[-1] if words else "no")
