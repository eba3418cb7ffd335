"""Where images come from: source layouts, detection, and the merged manifest.

Four layouts are recognised, each the way its publisher ships it:

1. Cohen's covid-chestxray-dataset: ``metadata.csv`` + ``images/``.  Only COVID-19
   X-rays of the chosen views are kept, with their ``patientid``.
2. Kermany's chest_xray: a root holding ``NORMAL/`` (optionally under train/test/val),
   or a ``NORMAL`` folder itself; the patient comes from the file name.
3. A plain class-folder root ``ROOT/<label>/*``.
4. A manifest CSV ``path,label[,patient_id,source]``.

All sources merge into one :class:`Manifest` (path, label, patient id, source, view,
SHA-256 of the bytes).  Byte-identical duplicates are dropped and counted; files named
in metadata but absent are counted and reported, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, SourceNotFound

COVID, NORMAL = 1, 0
LABEL_NAMES = {COVID: "COVID-19", NORMAL: "NORMAL"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}

_LABEL_ALIASES = {
    "covid": COVID, "covid-19": COVID, "covid19": COVID, "positive": COVID, "1": COVID,
    "normal": NORMAL, "negative": NORMAL, "healthy": NORMAL, "0": NORMAL,
}


def parse_label(text: str) -> int | None:
    """Map a class name to 1 (COVID-19) or 0 (NORMAL); ``None`` for other classes."""
    return _LABEL_ALIASES.get(text.strip().lower().replace("_", "-"))


@dataclass
class Record:
    path: str
    label: int
    patient_id: str
    source: str
    view: str = ""  # radiographic projection (PA, AP, ...), when the source says
    sha256: str = ""


@dataclass
class Manifest:
    """The merged list of images plus what was dropped on the way, and why."""

    records: list[Record] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped, kept)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> count

    def counts(self) -> dict[str, int]:
        out = {name: 0 for name in LABEL_NAMES.values()}
        for r in self.records:
            out[LABEL_NAMES[r.label]] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{n} {k}" for k, n in c.items()]
        s = f"{len(self.records)} images ({', '.join(parts)})"
        if self.duplicates:
            s += f", {len(self.duplicates)} byte-identical duplicates dropped"
        if self.missing:
            s += f", {len(self.missing)} listed files missing"
        return s


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def kermany_patient(filename: str) -> str:
    """Patient of a Kermany file: ``IM-0115-0001.jpeg`` -> ``IM-0115``,
    ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``, ``person1_virus_6.jpeg`` -> ``person1``."""
    stem = Path(filename).stem
    m = re.match(r"^((?:NORMAL2-)?IM-\d+)", stem)
    if m:
        return m.group(1)
    m = re.match(r"^(person\d+)_", stem)
    if m:
        return m.group(1)
    return stem


_KERMANY_NAME = re.compile(r"^((NORMAL2-)?IM-\d+|person\d+_)")


def _kermany_named(folder: Path) -> bool:
    """Most image names follow Kermany's patterns (IM-0115-0001, NORMAL2-IM-..., person1_...)."""
    names = [p.name for p in folder.iterdir() if _is_image(p)]
    return bool(names) and sum(bool(_KERMANY_NAME.match(n)) for n in names) >= 0.9 * len(names)


def detect_layout(src: Path) -> str:
    """Name the layout of a --data source: cohen, kermany, class (one class folder), folders or csv."""
    if src.is_file():
        if src.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"{src}: a file source must be a manifest CSV (path,label[,patient_id,source]).")
    if (src / "metadata.csv").is_file() and (src / "images").is_dir():
        return "cohen"
    labelled = {parse_label(d.name) for d in src.iterdir() if d.is_dir()} - {None}
    if parse_label(src.name) is not None:  # a class folder itself: Kermany's NORMAL, or another source's
        return "kermany" if parse_label(src.name) == NORMAL and _kermany_named(src) else "class"
    if COVID in labelled:  # a class-folder root; Kermany's chest_xray has no COVID-19 folder
        return "folders"
    kermany = [src / d / "NORMAL" for d in ("", "train", "test", "val") if (src / d / "NORMAL").is_dir()]
    if kermany and all(_kermany_named(k) for k in kermany):
        return "kermany"
    if labelled:
        return "folders"
    raise DataError(
        f"{src}: not a known layout. Expected a Cohen folder (metadata.csv + images/), "
        "a Kermany chest_xray folder or its NORMAL folder, class folders "
        "(ROOT/COVID-19/*, ROOT/NORMAL/*), or a manifest CSV."
    )


def _load_cohen(src: Path, views: tuple[str, ...], m: Manifest) -> list[Record]:
    out = []
    with open(src / "metadata.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            findings = {s.strip() for s in row.get("finding", "").split(",")}
            if "COVID-19" not in findings:
                m.ignored["cohen: finding is not COVID-19"] = m.ignored.get("cohen: finding is not COVID-19", 0) + 1
                continue
            if row.get("modality", "X-ray") != "X-ray":
                m.ignored["cohen: not an X-ray"] = m.ignored.get("cohen: not an X-ray", 0) + 1
                continue
            if row.get("view", "").strip().upper() not in views:
                key = f"cohen: view not in {','.join(views)}"
                m.ignored[key] = m.ignored.get(key, 0) + 1
                continue
            path = src / row.get("folder", "images") / row["filename"]
            if not path.is_file():
                m.missing.append((str(path), "listed in metadata.csv but not on disk"))
                continue
            out.append(Record(str(path), COVID, f"cohen:{row['patientid']}", "cohen", row["view"].strip().upper()))
    return out


def _load_kermany(src: Path) -> list[Record]:
    if src.name.upper() == "NORMAL":
        folders = [src]
    else:
        folders = [src / d / "NORMAL" for d in ("", "train", "test", "val") if (src / d / "NORMAL").is_dir()]
    out = []
    for folder in folders:
        for p in sorted(folder.iterdir()):
            if _is_image(p):
                out.append(Record(str(p), NORMAL, f"kermany:{kermany_patient(p.name)}", "kermany"))
    return out


def _load_folders(src: Path, m: Manifest) -> list[Record]:
    out = []
    for d in sorted(src.iterdir()):
        if not d.is_dir():
            continue
        label = parse_label(d.name)
        if label is None:
            m.ignored[f"{src.name}: class folder {d.name!r} is neither COVID-19 nor NORMAL"] = sum(
                1 for _ in d.iterdir()
            )
            continue
        for p in sorted(d.rglob("*")):
            if _is_image(p):
                out.append(Record(str(p), label, f"{src.name}:{p.stem}", src.name))
    return out


def _load_class_folder(src: Path) -> list[Record]:
    """``ROOT/NORMAL`` (or ``ROOT/COVID-19``) given directly: the class from the folder's name,
    the source from its parent's (``openist/NORMAL`` -> source ``openist``), one patient per file."""
    label = parse_label(src.name)
    source = src.resolve().parent.name or src.name
    return [Record(str(p), label, f"{source}:{p.stem}", source) for p in sorted(src.rglob("*")) if _is_image(p)]


def _load_csv(src: Path, m: Manifest) -> list[Record]:
    out = []
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{src}: a manifest CSV needs the columns path,label[,patient_id,source].")
        for i, row in enumerate(reader, start=2):
            label = parse_label(row["label"])
            if label is None:
                raise DataError(f"{src}, line {i}: label {row['label']!r} is neither COVID-19 nor NORMAL.")
            path = Path(row["path"])
            if not path.is_absolute():
                path = src.parent / path
            if not path.is_file():
                m.missing.append((str(path), f"listed in {src.name} but not on disk"))
                continue
            source = row.get("source") or src.stem
            patient = row.get("patient_id") or path.stem
            out.append(Record(str(path), label, f"{source}:{patient}", source))
    return out


def load_sources(sources: list[str | Path], views: tuple[str, ...] = ("PA",)) -> Manifest:
    """Read every source, hash every file, and merge into one de-duplicated manifest.

    Raises
    ------
    SourceNotFound
        A source path does not exist.
    DataError
        A source's layout is not recognised.
    """
    m = Manifest()
    views = tuple(v.strip().upper() for v in views)
    found: list[Record] = []
    for s in sources:
        src = Path(s).expanduser()
        if not src.exists():
            raise SourceNotFound(f"--data {s}: no such file or folder.")
        layout = detect_layout(src)
        if layout == "cohen":
            found += _load_cohen(src, views, m)
        elif layout == "kermany":
            found += _load_kermany(src)
        elif layout == "folders":
            found += _load_folders(src, m)
        elif layout == "class":
            found += _load_class_folder(src)
        else:
            found += _load_csv(src, m)
    seen: dict[str, str] = {}
    for r in found:
        r.path = str(Path(r.path).resolve())
        r.sha256 = _sha256(Path(r.path))
        if r.sha256 in seen:
            m.duplicates.append((r.path, seen[r.sha256]))
            continue
        seen[r.sha256] = r.path
        m.records.append(r)
    return m
