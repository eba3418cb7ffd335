"""The lungs probes (``audit --lungs MODEL``): the occlusion probe with the lung fields a lungs
model predicts instead of a box, both ways, on the same rows and paired with the run.

lungs_blanked: the lung fields blanked (filled with the mean of the pixels outside them).  A
head that still separates the classes beyond the margin above chance reads something outside
the lungs: labels, borders, the mediastinum, body size, the source.

lungs_only: everything outside the lung fields blanked (filled with the mean of the lung
pixels), the lungs kept, as ``extract --lungs MODEL --outside blank`` gives them.  Its status
is read the other way round from the blanking probes, so that FLAGGED keeps meaning "doubt"
across the audit (the model card counts it so): FLAGGED when the lungs alone are within the
margin of chance, or when the run scores beyond the margin above them (what the run reads lies,
at least in part, outside the lungs); CLEAR when the lungs alone separate the classes beyond
the margin above chance *and* the run is within the margin of them (an equivalence shown);
else INCONCLUSIVE.  CLEAR does not say the disease was learned: the lungs also show the source
(exposure, age, body size), which this probe cannot tell from the disease.

Both run beside the occlusion probe (they are ``part_of`` it, and run when it does and a lungs
model is given); each states the share of lung and other pixels its blanking covered over the
run's test images (:mod:`covfeat.probes.coverage`); their paired comparisons join the audit's
Holm family; their verdicts are read by :func:`covfeat.probes.retrain.occlusion_finish`.
"""

from __future__ import annotations

from covfeat.extraction.config import OcclusionConfig
from covfeat.probes.common import diff_text, holm_text, needed_text, paired_shown
from covfeat.probes.coverage import coverage
from covfeat.probes.probe import PROBES, AuditInputs, Probe
from covfeat.probes.retrain import coverage_text, occlusion_finish, occlusion_probe
from covfeat.trust.intervals import CLEAR, FLAGGED, INCONCLUSIVE

# audit.json key -> occlusion kind (covfeat.extraction.config.LUNG_KINDS)
LUNG_PROBES = {"lungs_blanked": "lungs", "lungs_only": "outside"}


def lungs_probe(a: AuditInputs, name: str) -> dict:
    """The run's images with the lung fields (``lungs_blanked``) or all but them (``lungs_only``)
    blanked, as the lungs model ``a.lungs`` finds them; the same head retrained on the same
    split, compared with chance and, on the same test rows, with the run's own."""
    occ = OcclusionConfig(kind=LUNG_PROBES[name], model=a.lungs)
    res = occlusion_probe(a.run, a.fc, a.fit, occ, a.cache_dir, a.progress, a.margin, name=name,
                          coverage=coverage(a.run, a.fc, a.lungs, occ))
    return FINISH[name](res)


def lungs_only_finish(res: dict) -> dict:
    """The lungs-only probe's verdict (see the module's docstring): read from the lungs-only
    head's AUC against chance (``verdict3``, as every occlusion result keeps it) and the paired
    difference, run minus lungs only, after Holm's correction."""
    if "paired" not in res:
        return res  # one class only: the occlusion probe's INCONCLUSIVE stands
    m, pd, chance = res["margin"], res["paired"], res["verdict3"]
    said = (f"with everything outside the lungs blanked, the same head retrained on the same split gives "
            f"{res['auc_texts']['occluded']}, against the run's own {res['auc_texts']['run']} on the same test images; "
            f"the run minus the lungs only is {diff_text(pd)}{holm_text(pd)}, margin {m:.2f}")
    run_ahead = paired_shown(pd) and pd["difference"] > 0
    if chance == CLEAR:
        status, text = FLAGGED, (f"FLAGGED: {said}. The lungs alone are within the margin of chance: what the run "
                                 "reads lies outside the lungs (labels, borders, the mediastinum, body size, the source).")
    elif run_ahead:
        status, text = FLAGGED, (f"FLAGGED: {said}. The whole image scores beyond the margin above the lungs alone: part "
                                 "of what the run reads lies outside the lungs.")
    elif chance == FLAGGED and res["roc_auc"][0] < 0.5:
        status, text = FLAGGED, f"FLAGGED: {said}. The lungs alone separate the classes the other way, below chance."
    elif chance == FLAGGED and pd["verdict3"] == CLEAR:
        status, text = CLEAR, (f"CLEAR: {said}. The lungs alone separate the classes beyond the margin above chance, "
                               "and as well as the whole image within the margin: what the run reads is there inside "
                               "the lungs. That is the disease, or the source as the lungs show it (exposure, age, "
                               "body size): this probe cannot tell them apart.")
    else:
        why = ("the lungs alone separate the classes, but whether the whole image adds more than the margin cannot be "
               "told" if chance == FLAGGED else "whether the lungs alone separate the classes cannot be told")
        status, text = INCONCLUSIVE, (f"INCONCLUSIVE: {said}; {why}; "
                                      f"{needed_text(pd['needed_patients'], pd['needed_for'])}.")
    return {**res, "status": status, "verdict": text + coverage_text(res.get("coverage"))}


FINISH = {"lungs_blanked": occlusion_finish,
          "lungs_only": lambda r: lungs_only_finish(occlusion_finish(r) if "paired" in r else r)}


for _name, _help in (("lungs_blanked", "(with --lungs) the lung fields blanked"),
                     ("lungs_only", "(with --lungs) only the lungs kept")):
    PROBES.register(Probe(_name, lambda a, n=_name: lungs_probe(a, n), help=_help,
                          on_request=lambda a: a.lungs is not None, part_of="occlusion",
                          finish=lambda r, n=_name: FINISH[n](r) if "paired" in r else r))
