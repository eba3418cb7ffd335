"""Confounding of class and source, per class: which sources hold images of one class only.

A source that no other class shares is a shortcut in the design itself: an image from it
carries its class in where it was taken, and no probe can rule out that a model reads the
source instead of the disease.  The old banner fired only when each class had exactly one
source; once a second NORMAL source is added, "every COVID-19 image comes from cohen" is
still true and still a confound, so the check is made class by class.  The report's banner
and the source probe both say it with :func:`statement`, so they never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassSources:
    """One class's sources: those no other class shares (``own``), the images from them, and
    the class's images in all."""
    label: str
    own: tuple[str, ...]
    n_own: int
    n: int

    @property
    def whole(self) -> bool:
        """Every image of the class comes from sources no other class shares."""
        return self.n > 0 and self.n_own == self.n


def by_class_from_keys(counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """``{"cohen/COVID-19": 40, ...}`` (a run's ``sources_test``) as class -> source -> images."""
    out: dict[str, dict[str, int]] = {}
    for key, n in counts.items():
        src, label = key.rsplit("/", 1)
        out.setdefault(label, {})[src] = out.get(label, {}).get(src, 0) + int(n)
    return out


def confounding(by_class: dict[str, dict[str, int]]) -> dict[str, ClassSources]:
    """For each class (class -> source -> images), the sources that no other class shares."""
    out = {}
    for label, srcs in by_class.items():
        held = {s for other, o in by_class.items() if other != label for s, k in o.items() if k > 0}
        own = tuple(sorted(s for s, k in srcs.items() if k > 0 and s not in held))
        out[label] = ClassSources(label, own, sum(srcs[s] for s in own), sum(srcs.values()))
    return out


def _names(srcs) -> str:
    return srcs[0] if len(srcs) == 1 else ", ".join(srcs[:-1]) + " or " + srcs[-1]


def statement(by_class: dict[str, dict[str, int]], noun: str = "image") -> str | None:
    """The confound in words, or None when every source holds more than one class.

    When every class comes wholly from sources of its own: "every COVID-19 image comes from
    cohen and every NORMAL one from kermany or openist, and no source holds both classes".
    Otherwise one clause per class that has sources of its own: "every COVID-19 image comes
    from cohen, a source no NORMAL image comes from", or "40 of 200 NORMAL images come from
    openist, ..." when only part of the class does."""
    conf = {k: v for k, v in confounding(by_class).items() if v.n}
    if len(conf) < 2 or not any(c.own for c in conf.values()):  # one class: no other to share with
        return None
    labels = sorted(conf, key=lambda k: (k != "COVID-19", k))  # COVID-19 first, as the report reads
    if len(conf) > 1 and all(c.whole for c in conf.values()):
        first, *rest = labels
        return (f"every {first} {noun} comes from {_names(conf[first].own)}"
                + "".join(f" and every {k} one from {_names(conf[k].own)}" for k in rest)
                + ", and no source holds both classes")
    clauses = []
    for k in labels:
        c = conf[k]
        if not c.own:
            continue
        others = " or ".join(o for o in labels if o != k)
        which = (f"a source no {others} {noun} comes from" if len(c.own) == 1 else
                 f"sources no {others} {noun} comes from")
        head = f"every {k} {noun} comes" if c.whole else f"{c.n_own} of {c.n} {k} {noun}s come"
        clauses.append(f"{head} from {_names(c.own)}, {which}")
    return "; ".join(clauses)
