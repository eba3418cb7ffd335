"""The shortcut audit: does a run read the disease, or where and how its images were made?

:func:`audit` runs the registered probes (:data:`covfeat.probes.probe.PROBES`) in order, each
with the number it rests on, its patient-level interval, a three-way verdict (FLAGGED, CLEAR
or INCONCLUSIVE against a stated margin, default 0.05 AUC, with the patients that would tell
when INCONCLUSIVE) and what would change it, and keeps them in ``RUN/audit.json`` (``report``
shows them).  Comparisons of two models on the same test rows are paired differences, and
Holm's correction adjusts them across the audit.  Today's five:

a. metadata (:mod:`~covfeat.probes.metadata`): a logistic regression on file metadata alone,
   cross-validated by patient group;
b. control (:mod:`~covfeat.probes.retrain`): the same head on a random-init backbone's
   features of the same images and split;
c. occlusion (:mod:`~covfeat.probes.retrain`): a central box (or the masked field) blanked,
   the same head retrained on the same split, its AUC compared with chance and, paired on the
   same rows, with the run's own; with --lungs (:mod:`~covfeat.probes.lungs`), two more on the
   same rows: the lung fields a lungs model predicts blanked (lungs_blanked), and everything
   but them blanked (lungs_only), each stating the share of lung and other pixels it covered;
d. source (:mod:`~covfeat.probes.source`): which sources a class has to itself, and within a
   class that has two or more sources, how well the features tell them apart;
e. external (:mod:`~covfeat.probes.external`), with --external: the run scored on another
   labelled source at the same threshold as its own test, per source, like with like.

Intervals resample patient groups (patients joined with their near-duplicates), not images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from covfeat.core.errors import ConfigError
from covfeat.extraction.config import OcclusionConfig
from covfeat.head.runs import Run
from covfeat.lungs.model import LungsModel
from covfeat.probes.probe import PROBES, AuditInputs, default_probes
from covfeat.store.reader import open_cache
from covfeat.trust.intervals import MARGIN, holm


def audit(run: str | Path, *, occlusion: OcclusionConfig | None = None, external: list | None = None,
          cache_dir: str | Path = "cache", probes: Iterable[str] | None = None, progress: bool = True,
          keep_overlap: bool = False, margin: float = MARGIN, lungs: str | Path | None = None) -> dict:
    """Run the probes on a finished run and write RUN/audit.json; returns the results.

    Parameters
    ----------
    probes
        Names of the probes to run (default: every registered probe that is not run on
        request).  A probe run on request (external) runs when its input is given instead.
    margin
        The AUC difference every three-way verdict treats as negligible (``--margin``).
    lungs
        A lungs model folder (``--lungs``): the lungs probes run beside the occlusion probe,
        and each occlusion result states the share of lung pixels it covered.

    Raises
    ------
    ConfigError
        ``probes`` names a probe that is not registered, or one that runs on request; the
        margin is not between 0 and 0.5; or ``lungs`` is not a sound lungs folder.
    """
    if not 0 < margin < 0.5:
        raise ConfigError(f"--margin: expected an AUC margin between 0 and 0.5 (default {MARGIN}); got {margin}.")
    chosen = default_probes() if probes is None else list(probes)
    for name in chosen:
        if name not in default_probes():
            raise ConfigError(f"probes: expected audit probes among {', '.join(default_probes())}; got {name!r}"
                              + (" (it runs when its own input is given)." if name in PROBES else "."))
    if lungs is not None:
        lungs = str(Path(lungs).resolve())
        LungsModel.load(lungs)  # a folder that is no sound lungs model is refused before any work
    run = Run(run).require_single("the audit")
    fc = open_cache(run.cache_info["path"])
    fit = run.fit_config()
    inputs = AuditInputs(run=run, fc=fc, fit=fit, cache_dir=cache_dir, progress=progress,
                         occlusion=occlusion or OcclusionConfig(kind="box"), external=external,
                         keep_overlap=keep_overlap, margin=margin, lungs=lungs)
    out = {"pretrained": fc.pretrained, "weights": fc.config["weights"]["label"]}  # each probe keeps its margin
    for probe in PROBES.values():
        wanted = probe.name in chosen if probe.on_request is None else probe.on_request(inputs)
        if probe.part_of is not None:
            wanted = wanted and probe.part_of in chosen
        if wanted:
            out[probe.name] = probe.run(inputs)
    holm_family(out)
    run.write_audit(out)
    return out


def holm_family(out: dict) -> None:
    """Holm's correction across the audit's paired comparisons (each probe's ``paired``: run vs
    control, run vs occluded, ...): each gets its adjusted p-value against its margin and the
    family's size, and its probe reads its verdict again with them (``Probe.finish``)."""
    family = [n for n, r in out.items() if isinstance(r, dict) and isinstance(r.get("paired"), dict)]
    for name, p in zip(family, holm([out[n]["paired"]["p_beyond_margin"] for n in family])):
        out[name]["paired"].update(p_holm=float(p), family=len(family), family_members=family)
        if PROBES[name].finish is not None:
            out[name] = PROBES[name].finish(out[name])


def summary(result: dict) -> str:
    """The audit's verdicts, one line per probe that ran, in the order they ran (read from the
    result itself, so an audit.json written with other probes reads the same)."""
    lines = []
    if not result.get("pretrained", True):
        lines.append("NOTE: features from a NOT PRETRAINED (random-init) backbone.")
    for name, res in result.items():
        if isinstance(res, dict) and "verdict" in res:
            lines.append(f"{name} probe: {res['verdict']}")
    return "\n".join(lines)
