"""Where images come from: source layouts, detection, and the merged manifest.

Four layouts are recognised, each the way its publisher ships it, each one :class:`Layout`
in :data:`LAYOUTS` (how to recognise it, how to read it, how to name it in help and errors):

1. Cohen's covid-chestxray-dataset: ``metadata.csv`` + ``images/``.  Only COVID-19
   X-rays of the chosen views are kept, with their ``patientid``.
2. Kermany's chest_xray: a root holding ``NORMAL/`` (optionally under train/test/val),
   or a ``NORMAL`` folder itself; the patient comes from the file name.
3. A plain class-folder root ``ROOT/<label>/*``, or one class folder given itself.
4. A manifest CSV ``path,label[,patient_id,source]``.

A new layout is one ``LAYOUTS.register(Layout(...))``; it is asked after those above.

All sources merge into one :class:`Manifest` (path, label, patient id, source, view,
SHA-256 of the bytes).  Byte-identical duplicates are dropped and counted; files named
in metadata but absent are counted and reported, never fatal.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from covfeat.core.errors import DataError, FileUnavailable, SourceNotFound
from covfeat.core.registry import Registry
from covfeat.imaging.decode import IMAGE_SUFFIXES, ImageLimits
from covfeat.imaging.inputs import NotOpened, sha256_regular

COVID, NORMAL = 1, 0
NOT_AN_IMAGE_NAME = "not an image or DICOM file name"


LABEL_NAMES = {COVID: "COVID-19", NORMAL: "NORMAL"}


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
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): listed but not there
    broken_links: list[tuple[str, str]] = field(default_factory=list)  # (link, target)
    not_images: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): never opened (not an image
    # file name, not a regular file, over --max-file-mb)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, other path): same bytes, two labels
    outside: int = 0  # manifest paths outside the manifest's folder
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
        names = sum(NOT_AN_IMAGE_NAME in why for _, why in self.not_images)
        for n, what in ((len(self.duplicates), "byte-identical duplicates dropped"),
                        (len(self.missing), "listed files missing"),
                        (len(self.broken_links), "broken links"),
                        (names, "non-image files not opened"),
                        (len(self.not_images) - names, "files not opened (not regular, or over --max-file-mb)"),
                        (len(self.conflicts), "listings dropped for conflicting labels"),
                        (self.outside, "manifest paths outside its folder")):
            if n:
                s += f", {n} {what}"
        return s


def _sha256(path: Path, max_file_mb: float | None) -> str:
    """The file's SHA-256, if it is a regular file within --max-file-mb (checked from ``stat``
    before it is opened: a FIFO would block planning, a device stream forever, a huge sparse
    file be hashed on every plan); else NotOpened with the reason."""
    try:
        return sha256_regular(path, max_file_mb)
    except OSError as exc:
        raise FileUnavailable(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}); make it readable or "
                              "leave it out of the data.") from None


def _is_image(p: Path) -> bool:
    """An image file name (any kind of file but a folder: a FIFO or device under an image's
    name is listed, and then not opened, with the reason, by :func:`load_sources`)."""
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.exists() and not p.is_dir()


def _broken_link(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def _scan(folder: Path, m: "Manifest", recursive: bool = False) -> list[Path]:
    """Image files of a folder, sorted; broken links counted (they would vanish otherwise)."""
    out = []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if _broken_link(p) and p.suffix.lower() in IMAGE_SUFFIXES:
            m.broken_links.append((str(p), os.readlink(p)))
        elif _is_image(p):
            out.append(p)
    return out


def _read_table(path: Path, what: str, needed: set[str]) -> tuple[list[dict], list[str]]:
    """Rows of a CSV read as UTF-8 (with or without a byte-order mark), its columns checked.

    Raises DataError naming the columns needed and those found, or the encoding problem.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                        "save it as UTF-8 and run again.") from None
    reader = csv.DictReader(text.splitlines())
    found = [c.strip() for c in (reader.fieldnames or [])]
    missing = sorted(needed - set(found))
    if missing:
        raise DataError(f"{path}: {what} needs the column(s) {', '.join(missing)}; found "
                        f"{', '.join(found) if found else 'none'}.")
    return [{(k or "").strip(): v for k, v in row.items()} for row in reader], found


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


def _kermany_roots(src: Path) -> list[Path]:
    """The NORMAL folders of a Kermany chest_xray root: ``NORMAL/`` or ``{train,test,val}/NORMAL/``."""
    return [src / d / "NORMAL" for d in ("", "train", "test", "val") if (src / d / "NORMAL").is_dir()]


def _load_cohen(src: Path, m: Manifest, views: tuple[str, ...]) -> list[Record]:
    out = []
    rows, _ = _read_table(src / "metadata.csv", "Cohen's metadata.csv", {"filename", "patientid", "finding", "view"})
    for row in rows:
        findings = {s.strip() for s in (row.get("finding") or "").split(",")}
        if "COVID-19" not in findings:
            m.ignored["cohen: finding is not COVID-19"] = m.ignored.get("cohen: finding is not COVID-19", 0) + 1
            continue
        if (row.get("modality") or "X-ray") != "X-ray":
            m.ignored["cohen: not an X-ray"] = m.ignored.get("cohen: not an X-ray", 0) + 1
            continue
        if (row.get("view") or "").strip().upper() not in views:
            key = f"cohen: view not in {','.join(views)}"
            m.ignored[key] = m.ignored.get(key, 0) + 1
            continue
        path = src / (row.get("folder") or "images") / row["filename"]
        if _broken_link(path):
            m.broken_links.append((str(path), os.readlink(path)))
            continue
        if not path.exists():
            m.missing.append((str(path), "listed in metadata.csv but not on disk"))
            continue
        out.append(Record(str(path), COVID, f"cohen:{row['patientid']}", "cohen", row["view"].strip().upper()))
    return out


def _load_kermany(src: Path, m: Manifest, views: tuple[str, ...]) -> list[Record]:
    folders = [src] if src.name.upper() == "NORMAL" else _kermany_roots(src)
    out = []
    for folder in folders:
        for p in _scan(folder, m):
            out.append(Record(str(p), NORMAL, f"kermany:{kermany_patient(p.name)}", "kermany"))
    return out


def _load_folders(src: Path, m: Manifest, views: tuple[str, ...]) -> list[Record]:
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
        for p in _scan(d, m, recursive=True):
            out.append(Record(str(p), label, f"{src.name}:{p.stem}", src.name))
    return out


def _load_class_folder(src: Path, m: Manifest, views: tuple[str, ...]) -> list[Record]:
    """``ROOT/NORMAL`` (or ``ROOT/COVID-19``) given directly: the class from the folder's name,
    the source from its parent's (``openist/NORMAL`` -> source ``openist``), one patient per file."""
    label = parse_label(src.name)
    source = src.resolve().parent.name or src.name
    return [Record(str(p), label, f"{source}:{p.stem}", source) for p in _scan(src, m, recursive=True)]


def _load_csv(src: Path, m: Manifest, views: tuple[str, ...]) -> list[Record]:
    """A manifest: only files with an image or DICOM extension are opened (others are listed as
    not opened, before any read); paths outside the manifest's folder are allowed and counted."""
    out = []
    rows, _ = _read_table(src, "a manifest CSV (path,label[,patient_id,source])", {"path", "label"})
    base = src.resolve().parent
    for i, row in enumerate(rows, start=2):
        label = parse_label(row["label"] or "")
        if label is None:
            raise DataError(f"{src}, line {i}: label {row['label']!r} is neither COVID-19 nor NORMAL.")
        path = Path(row["path"] or "")
        if not path.is_absolute():
            path = src.parent / path
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            m.not_images.append((str(path), f"{src.name}, line {i}: {NOT_AN_IMAGE_NAME}; not opened"))
            continue
        if _broken_link(path):
            m.broken_links.append((str(path), os.readlink(path)))
            continue
        if not path.exists():
            m.missing.append((str(path), f"listed in {src.name} but not on disk"))
            continue
        if not path.resolve().is_relative_to(base):
            m.outside += 1
        source = row.get("source") or src.stem
        patient = row.get("patient_id") or path.stem
        out.append(Record(str(path), label, f"{source}:{patient}", source))
    return out


# --------------------------------------------------------------------------- the layouts


@dataclass(frozen=True)
class Layout:
    """One way a source can be laid out on disk.

    ``detect(src)`` says whether a --data path (a file or a folder that exists) has this
    layout; the registered layouts are asked in registration order and the first that says
    yes reads it, so a detector may rely on the layouts before it having said no.
    ``load(src, m, views)`` returns its records (unhashed; :func:`load_sources` hashes and
    merges them), noting in the manifest ``m`` what it skipped and why; ``views`` are the
    radiographic projections to keep, for layouts that record them.  ``help`` names it on the
    command line, ``expected`` describes it in the error for an unknown source (layouts that
    share a phrase are named once).
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, Manifest, tuple[str, ...]], list[Record]]
    help: str
    expected: str


LAYOUTS: Registry[Layout] = Registry("data layout")


def _labelled_subfolders(src: Path) -> set[int]:
    return {parse_label(d.name) for d in src.iterdir() if d.is_dir()} - {None}


def _is_cohen(src: Path) -> bool:
    return src.is_dir() and (src / "metadata.csv").is_file() and (src / "images").is_dir()


def _is_kermany(src: Path) -> bool:
    """Kermany's NORMAL folder itself, or a root whose NORMAL folders hold Kermany's file names
    and which has no COVID-19 folder (Kermany's chest_xray has none; a root with one is class folders)."""
    if not src.is_dir():
        return False
    if parse_label(src.name) is not None:
        return parse_label(src.name) == NORMAL and _kermany_named(src)
    roots = _kermany_roots(src)
    return bool(roots) and COVID not in _labelled_subfolders(src) and all(_kermany_named(k) for k in roots)


def _is_class_folder(src: Path) -> bool:
    """A folder named for its class (``openist/NORMAL``); Kermany's own NORMAL folder was claimed before."""
    return src.is_dir() and parse_label(src.name) is not None


def _is_class_root(src: Path) -> bool:
    return src.is_dir() and parse_label(src.name) is None and bool(_labelled_subfolders(src))


def _is_manifest(src: Path) -> bool:
    return src.is_file() and src.suffix.lower() == ".csv"


_CLASS_FOLDERS = "class folders (ROOT/COVID-19/*, ROOT/NORMAL/*)"

# The order is the precedence: Kermany's own NORMAL folder is claimed before the class-folder
# layouts, which would read it too (as one source and one patient per file).
for _layout in (
    Layout("cohen", _is_cohen, _load_cohen, "Cohen folder", "a Cohen folder (metadata.csv + images/)"),
    Layout("kermany", _is_kermany, _load_kermany, "Kermany folder", "a Kermany chest_xray folder or its NORMAL folder"),
    Layout("class", _is_class_folder, _load_class_folder, "class folders", _CLASS_FOLDERS),
    Layout("folders", _is_class_root, _load_folders, "class folders", _CLASS_FOLDERS),
    Layout("csv", _is_manifest, _load_csv, "manifest CSV", "a manifest CSV"),
):
    LAYOUTS.register(_layout)


def _phrases(what: str) -> list[str]:
    """The registered layouts' ``help`` or ``expected`` phrases, each once, in order."""
    return list(dict.fromkeys(getattr(layout, what) for layout in LAYOUTS.values()))


def _or_list(phrases: list[str], comma_before_or: bool) -> str:
    if len(phrases) < 2:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + ("," if comma_before_or else "") + " or " + phrases[-1]


def describe_layouts() -> str:
    """The registered layouts in a few words, for --data's help:
    ``Cohen folder, Kermany folder, class folders or manifest CSV``."""
    return _or_list(_phrases("help"), comma_before_or=False)


def detect_layout(src: Path) -> str:
    """Name the layout of an existing --data source: the first registered layout that recognises
    it (cohen, kermany, class (one class folder), folders or csv, then any registered later).

    Raises
    ------
    DataError
        No layout recognises it: the error describes every registered layout.
    """
    for layout in LAYOUTS.values():
        if layout.detect(src):
            return layout.name
    if src.is_file():
        raise DataError(f"{src}: a file source must be a manifest CSV (path,label[,patient_id,source]).")
    raise DataError(f"{src}: not a known layout. Expected {_or_list(_phrases('expected'), comma_before_or=True)}.")


def _sha_of(path: str, listings: dict) -> str | None:
    return next((h for h, rs in listings.items() if any(r.path == path for r in rs)), None)


def load_sources(sources: list[str | Path], views: tuple[str, ...] = ("PA",), on_conflict: str = "error",
                 max_file_mb: float | None = None) -> Manifest:
    """Read every source, hash every file, and merge into one de-duplicated manifest.

    Only regular files within ``max_file_mb`` (--max-file-mb) are opened and hashed; the others
    are listed as not opened, with the reason (``not_images``), from ``stat`` alone.

    The same bytes under two labels is an error listing the files (``on_conflict="skip"``
    drops every copy of them instead, and counts them).

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
        found += LAYOUTS[detect_layout(src)].load(src, m, views)
    seen: dict[str, Record] = {}
    listings: dict[str, list[Record]] = {}
    for r in found:
        r.path = str(Path(r.path).resolve())
        try:
            r.sha256 = _sha256(Path(r.path), max_file_mb)
        except NotOpened as exc:
            m.not_images.append((r.path, str(exc)))
            continue
        listings.setdefault(r.sha256, []).append(r)
        first = seen.get(r.sha256)
        if first is None:
            seen[r.sha256] = r
            m.records.append(r)
        elif first.label == r.label:
            m.duplicates.append((r.path, first.path))
    conflicted = {h for h, rs in listings.items() if len({r.label for r in rs}) > 1}
    if conflicted:
        described = [" = ".join(f"{r.path} ({LABEL_NAMES[r.label]})" for r in listings[h]) for h in sorted(conflicted)]
        if on_conflict != "skip":
            more = f" and {len(described) - 3} more" if len(described) > 3 else ""
            raise DataError(f"{len(described)} image(s) have the same bytes under both labels: "
                            f"{'; '.join(described[:3])}{more}. Fix the labels, or pass --on-conflict skip to drop "
                            "every copy of them.")
        m.records = [r for r in m.records if r.sha256 not in conflicted]
        m.duplicates = [d for d in m.duplicates if _sha_of(d[0], listings) not in conflicted]
        m.conflicts = [(r.path, "dropped: the same bytes are listed as " +
                        " and ".join(sorted({LABEL_NAMES[x.label] for x in listings[h]})))
                       for h in sorted(conflicted) for r in listings[h]]
    return m


def content_hashes(sources: list[str | Path], max_file_mb: float | None = ImageLimits.max_file_mb):
    """The SHA-256 of every image of ``sources``, as a function of the radiographic views
    kept (what :func:`covfeat.store.catalog.choose_cache` compares a cache's images with);
    files over ``max_file_mb`` (the default --max-file-mb) are not opened, as extraction does not."""
    return lambda views: {r.sha256 for r in load_sources(sources, views=views, on_conflict="skip",
                                                         max_file_mb=max_file_mb).records}
