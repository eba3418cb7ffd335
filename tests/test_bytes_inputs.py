"""Inputs bound to their bytes (issue 18, items 1, 2 and 11), as a user meets them: a file that
changes after it was listed stops the run naming it; every format's size is measured before
anything decodes it; only regular files are opened; memory running out is not a lasting skip."""

import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLE, make_mini
from typer.testing import CliRunner

from covfeat.cli import app

runner = CliRunner()
EX = ["extract", "-b", "inception_v3", "--weights", "none", "--augment", "0"]


def invoke(args, timeout=180):
    """The CLI in-process, failing (not hanging) if it does not return: a FIFO blocks its opener."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", runner.invoke(app, args)), daemon=True)
    t.start()
    t.join(timeout)
    assert "r" in box, f"covfeat {args[0]} did not return within {timeout} s"
    return box["r"]


def last(r) -> str:
    return r.stdout.strip().splitlines()[-1]


def err(r) -> str:
    return r.stderr.strip().splitlines()[-1]


def info_sections(cache: str) -> dict[str, tuple[str, str]]:
    """File name -> (section of `covfeat info`, reason)."""
    out, section = {}, None
    for line in runner.invoke(app, ["info", cache]).stdout.splitlines():
        if not line.startswith("  "):
            section = line.split(":")[0]
        elif ": " in line:
            path, why = line.strip().split(": ", 1)
            out[Path(path).name] = (section, why)
    return out


def small_jpeg(side=96) -> bytes:
    img = (np.random.default_rng(0).random((side, side)) * 255).astype(np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def junk_jpeg(height: int, width: int) -> bytes:
    """A JPEG whose frame header says height x width, with one junk byte before that header
    (libjpeg only warns about it), so a parser that stops at the first non-marker misses it."""
    data = bytearray(small_jpeg())
    i = 2
    while data[i + 1] not in (0xC0, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data[:i]) + b"\x00" + bytes(data[i:])


def claimed_tiff(height: int, width: int) -> bytes:
    """A small TIFF whose header claims height x width 8-bit grey pixels (its strip is short):
    what a decoder allocates is what the header says."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, height * width)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 4096


def dicom(path: Path, rows: int, cols: int, pixels: bytes | None = None) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels if pixels is not None else b"\0" * 4096
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A small data set and, among its NORMAL images, every kind of file these items are about."""
    pytest.importorskip("pydicom")
    d = make_mini(tmp_path_factory.mktemp("hostile"), n_covid=4, n_normal=4)
    n = d["normal"]
    (n / "IM-9500-0001.png").write_bytes(claimed_tiff(30000, 30000))  # TIFF content, PNG name
    (n / "IM-9501-0001.jpeg").write_bytes(junk_jpeg(30000, 30000))
    dicom(n / "IM-9502-0001.dcm", 9000, 9000)
    rng = np.random.default_rng(1)
    (n / "IM-9503-0001.png").write_bytes(cv2.imencode(".hdr", rng.random((96, 96, 3)).astype(np.float32))[1])
    os.mkfifo(n / "IM-9504-0001.png")
    (n / "IM-9505-0001.png").symlink_to("/dev/zero")
    with open(n / "IM-9506-0001.png", "wb") as f:  # a sparse 300 MB "image"
        f.truncate(300 * 2**20)
    arr = (rng.random((96, 96)) * 255).astype(np.uint8)
    dicom(n / "IM-9507-0001.dcm", 96, 96, arr.tobytes())  # a sound DICOM: extracted, and measured by the audit
    return d


def test_every_format_is_measured_before_decoding_and_only_regular_files_are_opened(hostile, tmp_path):
    args = EX + ["--data", str(hostile["cohen"]), "--data", str(hostile["normal"])]
    r = invoke(args + ["--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "3 files not opened (not regular, or over --max-file-mb)" in r.stderr
    got = info_sections(last(r))
    skipped = "skipped at extraction"
    not_opened = "not opened (not an image file name, not a regular file, or over --max-file-mb)"
    assert got["IM-9500-0001.png"] == (skipped, "30000 x 30000 = 900 Mpx exceeds --max-pixels 64000000")
    assert got["IM-9501-0001.jpeg"] == (skipped, "30000 x 30000 = 900 Mpx exceeds --max-pixels 64000000")
    assert got["IM-9502-0001.dcm"] == (skipped, "9000 x 9000 = 81 Mpx exceeds --max-pixels 64000000")
    assert got["IM-9503-0001.png"] == (skipped, "cannot measure its size before decoding (format hdr); "
                                                "--max-pixels 0 decodes it anyway")
    assert got["IM-9504-0001.png"][1] == "not a regular file (FIFO); not opened"
    assert got["zero"][1] == "not a regular file (character device); not opened"  # the link, resolved
    assert got["IM-9506-0001.png"] == (not_opened, "file of 300 MB exceeds --max-file-mb 256")  # never hashed
    assert "IM-9507-0001.dcm" not in got  # a sound DICOM is extracted
    # --max-pixels 0: no pixel limit, and what cannot be measured is decoded
    r = invoke(args + ["--cache-dir", str(tmp_path / "c0"), "--max-pixels", "0"])
    assert r.exit_code == 0, r.output
    assert "IM-9503-0001.png" not in info_sections(last(r))


@pytest.mark.parametrize("ext", [".tiff", ".bmp", ".webp", ".jp2", ".ppm", ".ras", ".avif", ".png", ".jpg"])
def test_each_format_opencv_writes_is_measured_from_its_header(ext):
    from covfeat.imaging.measure import measure

    try:
        ok, buf = cv2.imencode(ext, np.zeros((70, 90, 3), np.uint8))
    except cv2.error:
        pytest.skip(f"this OpenCV cannot write {ext}")
    size, _ = measure(buf.tobytes())
    assert (size.height, size.width) == (70, 90)


def test_a_jpeg_with_a_junk_byte_before_its_frame_header_is_measured():
    from covfeat.imaging.measure import measure

    size, fmt = measure(junk_jpeg(5000, 7000))
    assert fmt == "jpeg" and (size.height, size.width) == (5000, 7000)


def test_a_file_changed_after_it_was_listed_stops_the_run_naming_it(tmp_path, monkeypatch):
    """Listed (hashed), then replaced before it is decoded: features of the new bytes must not be
    stored under the old hash. The run stops with one line, nothing recorded; a rerun lists it anew."""
    import covfeat.extraction.plan as ex
    from covfeat.core.fsutil import sha256_file

    d = make_mini(tmp_path / "d", n_covid=4, n_normal=4)
    victim = sorted(d["normal"].iterdir())[-1]
    before = sha256_file(victim)
    replacement = next(p for p in sorted((SAMPLE / "kermany" / "NORMAL").iterdir())[8:])
    real = ex.load_sources

    def listed_then_replaced(*a, **k):
        m = real(*a, **k)
        victim.write_bytes(replacement.read_bytes())
        return m

    monkeypatch.setattr(ex, "load_sources", listed_then_replaced)
    args = EX + ["--data", str(d["cohen"]), "--data", str(d["normal"]), "--cache-dir", str(tmp_path / "c")]
    r = invoke(args)
    assert r.exit_code == 1
    now = sha256_file(victim)
    assert err(r) == (f"error: {victim}: changed since it was listed (SHA-256 {before[:12]}... planned, {now[:12]}... "
                      "now); nothing was recorded for it. Run the command again to list it anew: finished shards are "
                      "kept.")
    assert not list((tmp_path / "c").glob("*.h5"))
    monkeypatch.setattr(ex, "load_sources", real)
    r = invoke(args)
    assert r.exit_code == 0, r.output
    assert "skipped at extraction: 0" in runner.invoke(app, ["info", last(r)]).stdout


def test_memory_running_out_while_decoding_is_not_a_lasting_skip(tmp_path, monkeypatch):
    """A MemoryError is the machine's state, not the file's: the run stops with one line, no shard
    records a skip, and the rerun extracts the file."""
    d = make_mini(tmp_path / "d", n_covid=4, n_normal=4)
    victim = sorted(d["normal"].iterdir())[-1]
    size = victim.stat().st_size
    real = cv2.imdecode

    def short_of_memory(buf, flags):
        if len(buf) == size:
            raise MemoryError()
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", short_of_memory)
    args = EX + ["--data", str(d["cohen"]), "--data", str(d["normal"]), "--cache-dir", str(tmp_path / "c")]
    r = invoke(args)
    assert r.exit_code == 1
    assert err(r) == (f"error: {victim}: memory ran out while decoding it; nothing was recorded for it. Free memory "
                      "(or use fewer --workers) and run again: finished shards are kept.")
    assert not list((tmp_path / "c").glob("*.h5"))
    monkeypatch.setattr(cv2, "imdecode", real)
    r = invoke(args)
    assert r.exit_code == 0, r.output
    assert "skipped at extraction: 0" in runner.invoke(app, ["info", last(r)]).stdout


def test_predict_does_not_open_a_fifo_or_a_device(mini_run, mini, tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    good = sorted(mini["normal"].iterdir())[0]
    r = invoke(["predict", "--run", str(mini_run), str(good), str(fifo), "/dev/zero"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(str(fifo) in line and line.endswith("skipped: not a regular file (FIFO); not opened") for line in lines)
    assert any("/dev/zero" in line and line.endswith("skipped: not a regular file (character device); not opened")
               for line in lines)


def test_the_metadata_probe_measures_dicom_and_reports_a_changed_file(hostile, tmp_path):
    from covfeat.probes.metadata import metadata_probe
    from covfeat.store.reader import open_cache

    r = invoke(EX + ["--data", str(hostile["cohen"]), "--data", str(hostile["normal"]), "--cache-dir",
                     str(tmp_path / "c")])
    fc = open_cache(last(r))
    assert any(p.endswith(".dcm") for p in fc.manifest["path"])
    out = metadata_probe(fc)
    assert out["unreadable"] == 0 and out["changed"] == 0 and any("dicom" in k for k in out["kinds_by_class"]["NORMAL"])
    victim = Path(next(p for p in fc.manifest["path"] if "kermany" in p and p.endswith(".jpeg")))
    kept = victim.read_bytes()
    try:
        victim.write_bytes(kept + b"\0")
        out = metadata_probe(fc)
        assert out["changed"] == 1 and out["unreadable"] == 0
        assert "1 file(s) changed since extraction" in out["verdict"]
    finally:
        victim.write_bytes(kept)


# --------------------------------------------------------------------------- the bomb, by memory


_PEAK = """import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_mb(args) -> float:
    r = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "covfeat.cli", *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip()) / 1024


@pytest.mark.slow
def test_a_30000_square_tiff_named_png_is_skipped_within_200_mb_of_the_run_without_it(tmp_path):
    d = make_mini(tmp_path / "d", n_covid=4, n_normal=4)
    base = EX + ["--data", str(d["cohen"]), "--data", str(d["normal"]), "--workers", "1"]
    without = _peak_mb(base + ["--cache-dir", str(tmp_path / "a")])
    ok, buf = cv2.imencode(".tiff", np.zeros((30000, 30000), np.uint8))  # 900 MB once; a small file
    assert ok
    (d["normal"] / "IM-9600-0001.png").write_bytes(buf.tobytes())
    with_bomb = _peak_mb(base + ["--cache-dir", str(tmp_path / "b")])
    assert with_bomb - without < 200, (with_bomb, without)
    r = runner.invoke(app, EX + ["--data", str(d["cohen"]), "--data", str(d["normal"]), "--cache-dir",
                                 str(tmp_path / "b")])
    assert info_sections(last(r))["IM-9600-0001.png"] == ("skipped at extraction",
                                                          "30000 x 30000 = 900 Mpx exceeds --max-pixels 64000000")
