"""The lungs probes (``audit --lungs MODEL``): the occlusion probe with the lung fields a lungs
model predicts instead of a box, both ways, on the same rows and paired with the run.

lungs_blanked: the lung fields blanked (filled with the mean of the pixels outside them).  A
head that still separates the classes beyond the margin above chance reads something outside
the lungs: labels, borders, the mediastinum, body size, the source.

lungs_only: everything outside the lung fields blanked (filled with the mean of the lung
pixels), the lungs kept, as ``extract --lungs MODEL --outside blank`` gives them.  A head that
separates the classes here reads something inside the lungs: the disease, or the source as
the lungs show it (exposure, age, body size); one at chance shows that what the run reads lies
outside them.

Both run beside the occlusion probe (they are ``part_of`` it, and run when it does and a lungs
model is given); each states the share of lung and other pixels its blanking covered over the
run's test images (:mod:`covfeat.probes.coverage`); their paired comparisons join the audit's
Holm family; their verdicts are read by :func:`covfeat.probes.retrain.occlusion_finish`.
"""

from __future__ import annotations

from covfeat.extraction.config import OcclusionConfig
from covfeat.probes.coverage import coverage
from covfeat.probes.probe import PROBES, AuditInputs, Probe
from covfeat.probes.retrain import occlusion_finish, occlusion_probe

# audit.json key -> occlusion kind (covfeat.extraction.config.LUNG_KINDS)
LUNG_PROBES = {"lungs_blanked": "lungs", "lungs_only": "outside"}


def lungs_probe(a: AuditInputs, name: str) -> dict:
    """The run's images with the lung fields (``lungs_blanked``) or all but them (``lungs_only``)
    blanked, as the lungs model ``a.lungs`` finds them; the same head retrained on the same
    split, compared with chance and, on the same test rows, with the run's own."""
    occ = OcclusionConfig(kind=LUNG_PROBES[name], model=a.lungs)
    return occlusion_probe(a.run, a.fc, a.fit, occ, a.cache_dir, a.progress, a.margin, name=name,
                           coverage=coverage(a.run, a.fc, a.lungs, occ))


for _name, _help in (("lungs_blanked", "(with --lungs) the lung fields blanked"),
                     ("lungs_only", "(with --lungs) only the lungs kept")):
    PROBES.register(Probe(_name, lambda a, n=_name: lungs_probe(a, n), help=_help,
                          on_request=lambda a: a.lungs is not None, part_of="occlusion",
                          finish=lambda r: occlusion_finish(r) if "paired" in r else r))
