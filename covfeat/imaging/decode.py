"""Decoding a radiograph file into pixels, and the limits a file must meet first.

Decoding is OpenCV's (BGR -> RGB as in the paper), with greyscale, RGBA and 16-bit
files turned into 3-channel arrays in the 8-bit range (16-bit scaled by the image's real
range, never truncated); DICOM goes through pydicom (the optional ``dicom`` extra), with
MONOCHROME1 inverted.  Every failure raises :class:`UnreadableImage` with a reason that
ends up in the cache's skip report.

A file is read once (regular files only, :mod:`covfeat.imaging.inputs`) and everything is
decoded from those bytes: an extraction checks them against the SHA-256 taken when the file
was listed (:func:`read_file`), so the features stored under a hash are those of its bytes,
and the image's size is measured from them before any decoder allocates it
(:mod:`covfeat.imaging.measure`).

This sits below both stage one and the lung segmenter, so that extraction, prediction,
Grad-CAM and the segmenter all see the same pixels of a file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np

from covfeat.core.errors import FileChanged, FileUnavailable
from covfeat.imaging.inputs import NotOpened, check_regular, read_regular
from covfeat.imaging.measure import header_info, is_dicom, measure

INPUT_SIZE = 224  # the backbones' input side: every model input is INPUT_SIZE x INPUT_SIZE x 3

# The files covfeat opens as images when it searches a folder (extraction's sources, the lung
# segmenter's training pairs and predictions): one list, so no stage opens what another skips.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"})


class UnreadableImage(Exception):
    """A file that cannot be decoded into a radiograph; ``str(exc)`` is the reason."""


def _unavailable(path: Path, exc: OSError):
    return FileUnavailable(f"{path}: cannot be read now ({exc.strerror or type(exc).__name__}); nothing was recorded "
                           "for it. Make it readable (or remove it from the data) and run again: finished shards are "
                           "kept.")


def _to_rgb_float(img: np.ndarray, size: int | None = None) -> np.ndarray:
    """Any decoded array (H,W) / (H,W,1|3|4) of uint8/uint16/float -> float32 RGB in [0, 255],
    resized to size x size first when ``size`` is given (cheaper on the small array, and an
    8-bit image is resized as 8-bit, as the paper's cv2.imread + cv2.resize did)."""
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    lo = hi = None
    if img.dtype != np.uint8:
        # 16-bit and float images: stretch their real range onto [0, 255], never truncate.
        lo, hi = float(img.min()), float(img.max())
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise UnreadableImage("non-finite pixel values")
        if img.dtype not in (np.uint16, np.float32):
            img = img.astype(np.float32)
    if size is not None:
        img = resize(img, size)
    out = img.astype(np.float32)
    if lo is not None:
        out = (out - lo) * np.float32(255.0 / (hi - lo)) if hi > lo else np.zeros_like(out)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return out


def _read_dicom(data: bytes, size: int | None = None) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise UnreadableImage("DICOM needs the optional extra: pip install 'covfeat[dicom]'") from None
    try:
        ds = pydicom.dcmread(BytesIO(data))
        arr = ds.pixel_array.astype(np.float32)
    except MemoryError:
        raise
    except Exception as exc:
        raise UnreadableImage(f"unreadable DICOM ({type(exc).__name__})") from None
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[0]  # multi-frame: first frame
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() - arr  # MONOCHROME1: high values are dark
    return _to_rgb_float(arr, size)  # float input: stretched from its real range


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, without decoding; None if not found."""
    info = header_info(data) if data[:3] == b"\xff\xd8\xff" else None
    return (info["height"], info["width"]) if info else None


_REDUCED = {2: (cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2),
            4: (cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4),
            8: (cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8)}


def read_file(path: str | Path, limits: "ImageLimits | None" = None, sha256: str | None = None) -> bytes:
    """The bytes of an input file, read once: a regular file only, within ``limits``' file size,
    and, given ``sha256`` (the hash taken when the file was listed), those very bytes.

    Raises
    ------
    UnreadableImage
        Not a regular file, or over --max-file-mb.
    FileUnavailable
        It cannot be read now.
    FileChanged
        Its bytes are not the listed ones.
    """
    path = Path(path)
    try:
        data = read_regular(path, limits.max_file_mb if limits is not None else None)
    except NotOpened as exc:
        raise UnreadableImage(str(exc)) from None
    except OSError as exc:
        raise _unavailable(path, exc) from None
    if sha256 is not None:
        now = hashlib.sha256(data).hexdigest()
        if now != sha256:
            raise FileChanged(f"{path}: changed since it was listed (SHA-256 {sha256[:12]}... planned, {now[:12]}... "
                              "now); nothing was recorded for it. Run the command again to list it anew: finished "
                              "shards are kept.")
    return data


def decode(path: str | Path, min_side: int | None = None, size: int | None = None,
           limits: "ImageLimits | None" = None, data: bytes | None = None) -> np.ndarray:
    """Decode one file to float32 RGB in [0, 255] at its own size: its bytes ``data`` when the
    caller holds them (read and checked with :func:`read_file`), else the file read once.

    With ``limits``, the image's size is measured from the bytes before anything decodes them
    (:mod:`covfeat.imaging.measure`) and checked; an image that cannot be measured is refused,
    unless --max-pixels is 0.  With ``min_side``, a large JPEG is decoded at 1/2, 1/4 or 1/8
    scale in the DCT domain (libjpeg's own scaled decoding), as long as its shorter side stays
    >= ``min_side``: several times faster, and the image is resized to 224 afterwards anyway.
    With ``size``, the result is resized to size x size (see :func:`load`).

    Raises
    ------
    UnreadableImage
        Zero-byte, truncated, corrupt, non-image, unmeasurable or over-limit files.
    MemoryError
        Memory ran out while decoding (the decoder's own allocation failure included).
    """
    path = Path(path)
    if data is None:
        data = read_file(path, limits)
    if not data:
        raise UnreadableImage("zero-byte file")
    hw = None
    if limits is not None:
        hw = limits.check_bytes(data, path.suffix)
    if is_dicom(data, path.suffix):
        return _read_dicom(data, size)
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in data[-64:]:
        # Some libjpeg builds pad a cut-off JPEG with grey and only warn; a half-grey
        # radiograph would silently poison the features, so a missing end marker is a skip.
        raise UnreadableImage("truncated JPEG (no end-of-image marker)")
    buf = np.frombuffer(data, np.uint8)
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    if min_side and data[:3] == b"\xff\xd8\xff":
        hw = hw or jpeg_size(data)
        if hw is not None:
            for factor in (8, 4, 2):
                if min(hw) // factor >= min_side:
                    flags = _REDUCED[factor][1]
                    break
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:  # OpenCV refuses beyond OPENCV_IO_MAX_IMAGE_PIXELS, among others
        if exc.code == cv2.Error.StsNoMem:
            raise MemoryError(str(exc)) from None
        raise UnreadableImage("not a decodable image (refused by the decoder: corrupt or too large)") from None
    if img is None or img.size == 0:
        raise UnreadableImage("not a decodable image (corrupt, truncated or not an image)")
    if limits is not None:
        limits.check_size(*img.shape[:2])  # what was decoded, whatever the header said
    if img.ndim == 3 and img.shape[2] >= 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return _to_rgb_float(img, size)


def load(path: str | Path, min_side: int | None = None, limits: "ImageLimits | None" = None,
         data: bytes | None = None) -> np.ndarray:
    """Decode once and resize to the 224 x 224 model input: float32 RGB in [0, 255]."""
    return decode(path, min_side=min_side, size=INPUT_SIZE, limits=limits, data=data)


def header_size_of(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG or JPEG header, without decoding; None for other formats."""
    info = header_info(data)
    return (info["height"], info["width"]) if info else None


SCALED_DECODE_MIN_SIDE = 2 * INPUT_SIZE


def resize(img: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Resize to size x size (area interpolation when shrinking, as radiographs mostly are)."""
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class ImageLimits:
    """What a file may cost before covfeat decodes it: a file over a limit is skipped with a
    reason that names the limit and the flag that raises it.  The defaults are far beyond
    any real radiograph (the largest in the reproduction set is 4,248 x 3,480).
    ``max_pixels`` 0 is no pixel limit: files whose size cannot be measured are decoded too."""

    max_pixels: int = 64_000_000
    max_file_mb: float = 256.0
    min_side: int = 64
    max_aspect: float = 4.0

    def check_file(self, path: Path) -> None:
        """A regular file within --max-file-mb, from ``stat`` (nothing opened)."""
        try:
            check_regular(path, self.max_file_mb)
        except NotOpened as exc:
            raise UnreadableImage(str(exc)) from None
        except OSError as exc:
            raise _unavailable(path, exc) from None

    def check_bytes(self, data: bytes, suffix: str = "") -> tuple[int, int] | None:
        """(height, width) of the image in ``data``, measured before decoding and checked.

        Raises UnreadableImage: over a limit, or not measurable while there is a pixel limit
        (OpenCV and pydicom allocate the whole image first), or a format nothing decodes."""
        size, fmt = measure(data, suffix)
        if size is None:
            if fmt is None:
                raise UnreadableImage("not a decodable image (corrupt, truncated or not an image)")
            if not self.max_pixels:
                return None
            raise UnreadableImage(f"cannot measure its size before decoding (format {fmt}); --max-pixels 0 decodes "
                                  "it anyway")
        self.check_size(size.height, size.width, size.frames)
        return size.height, size.width

    def check_size(self, h: int, w: int, frames: int = 1) -> None:
        if self.max_pixels and h * w * frames > self.max_pixels:
            what = f"{w} x {h}" + (f" x {frames} frames" if frames > 1 else "")
            raise UnreadableImage(f"{what} = {h * w * frames / 1e6:.0f} Mpx exceeds --max-pixels {self.max_pixels}")
        if min(h, w) < self.min_side:
            raise UnreadableImage(f"{w} x {h}: shorter side below --min-side {self.min_side}")
        if max(h, w) / max(min(h, w), 1) > self.max_aspect:
            raise UnreadableImage(f"{w} x {h}: aspect ratio {max(h, w) / max(min(h, w), 1):.1f} exceeds "
                                  f"--max-aspect {self.max_aspect:g}")


METADATA_FIELDS = ("height", "width", "channels", "bit_depth", "format", "file_bytes")


def file_metadata(path: str | Path, sha256: str | None = None) -> dict:
    """What a file says about itself, without the pixels: height, width, channels, bit depth,
    format and size in bytes, read from its header (:mod:`covfeat.imaging.measure`: PNG, JPEG,
    DICOM through pydicom, the others through Pillow), the file read once; given ``sha256``,
    only from the bytes that hash to it.

    Raises
    ------
    UnreadableImage
        Not readable, not a regular file, or a header that cannot be measured.
    FileChanged
        Its bytes are not those of ``sha256``.
    """
    path = Path(path)
    try:
        data = read_file(path, sha256=sha256)
    except FileUnavailable as exc:
        raise UnreadableImage(f"cannot read file ({exc})") from None
    size, fmt = measure(data, path.suffix)
    if size is None:
        raise UnreadableImage(f"cannot measure its size (format {fmt or 'unknown'})")
    return {"height": size.height, "width": size.width, "channels": size.channels, "bit_depth": size.bit_depth,
            "format": size.format, "file_bytes": len(data)}


cv2.setNumThreads(1)  # decoding runs in a thread pool beside the forward pass
