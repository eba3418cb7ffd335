"""Decoding a radiograph file into pixels, and the limits a file must meet first.

Decoding is OpenCV's (BGR -> RGB as in the paper), with greyscale, RGBA and 16-bit
files turned into 3-channel arrays in the 8-bit range (16-bit scaled by the image's real
range, never truncated); DICOM goes through pydicom (the optional ``dicom`` extra), with
MONOCHROME1 inverted.  Every failure raises :class:`UnreadableImage` with a reason that
ends up in the cache's skip report.

This sits below both stage one and the lung segmenter, so that extraction, prediction,
Grad-CAM and the segmenter all see the same pixels of a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

INPUT_SIZE = 224  # the backbones' input side: every model input is INPUT_SIZE x INPUT_SIZE x 3

# The files covfeat opens as images when it searches a folder (extraction's sources, the lung
# segmenter's training pairs and predictions): one list, so no stage opens what another skips.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"})


class UnreadableImage(Exception):
    """A file that cannot be decoded into a radiograph; ``str(exc)`` is the reason."""


def _unavailable(path: Path, exc: OSError):
    from covfeat.core.errors import FileUnavailable

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


def _read_dicom(path: Path, size: int | None = None) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise UnreadableImage("DICOM needs the optional extra: pip install 'covfeat[dicom]'") from None
    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise UnreadableImage(f"unreadable DICOM ({type(exc).__name__})") from None
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[0]  # multi-frame: first frame
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() - arr  # MONOCHROME1: high values are dark
    return _to_rgb_float(arr, size)  # float input: stretched from its real range


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_info(data: bytes) -> dict | None:
    """Height, width, channels, bit depth and format from a PNG or JPEG header (the first bytes
    of the file), without decoding; None for other formats or when the header is not there."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return {"height": int.from_bytes(data[20:24], "big"), "width": int.from_bytes(data[16:20], "big"),
                "channels": _PNG_CHANNELS.get(data[25], 0), "bit_depth": data[24], "format": "png"}
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in _SOF:
            return {"height": int.from_bytes(data[i + 5:i + 7], "big"), "width": int.from_bytes(data[i + 7:i + 9], "big"),
                    "channels": data[i + 9], "bit_depth": data[i + 4], "format": "jpeg"}
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, without decoding; None if not found."""
    info = header_info(data) if data[:3] == b"\xff\xd8\xff" else None
    return (info["height"], info["width"]) if info else None


_REDUCED = {2: (cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2),
            4: (cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4),
            8: (cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8)}


def decode(path: str | Path, min_side: int | None = None, size: int | None = None,
           limits: "ImageLimits | None" = None) -> np.ndarray:
    """Decode one file to float32 RGB in [0, 255] at its own size.

    With ``min_side``, a large JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (libjpeg's own scaled decoding), as long as its shorter side stays >= ``min_side``:
    several times faster, and the image is resized to 224 afterwards anyway.  With
    ``size``, the result is resized to size x size (see :func:`load`).

    Raises
    ------
    UnreadableImage
        Zero-byte, truncated, corrupt, non-image or unreadable files.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _unavailable(path, exc) from None
    if not data:
        raise UnreadableImage("zero-byte file")
    if path.suffix.lower() in (".dcm", ".dicom") or data[128:132] == b"DICM":
        return _read_dicom(path, size)
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in data[-64:]:
        # Some libjpeg builds pad a cut-off JPEG with grey and only warn; a half-grey
        # radiograph would silently poison the features, so a missing end marker is a skip.
        raise UnreadableImage("truncated JPEG (no end-of-image marker)")
    buf = np.frombuffer(data, np.uint8)
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    hw = header_size_of(data)
    if limits is not None and hw is not None:  # the whole header is here, beyond check_file's first 64 KiB
        limits.check_size(*hw)
    if min_side and data[:3] == b"\xff\xd8\xff":
        if hw is not None:
            for factor in (8, 4, 2):
                if min(hw) // factor >= min_side:
                    flags = _REDUCED[factor][1]
                    break
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error:  # OpenCV refuses beyond OPENCV_IO_MAX_IMAGE_PIXELS, among others
        raise UnreadableImage("not a decodable image (refused by the decoder: corrupt or too large)") from None
    if img is None or img.size == 0:
        raise UnreadableImage("not a decodable image (corrupt, truncated or not an image)")
    if limits is not None and hw is None:
        limits.check_size(*img.shape[:2])
    if img.ndim == 3 and img.shape[2] >= 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return _to_rgb_float(img, size)


def load(path: str | Path, min_side: int | None = None, limits: "ImageLimits | None" = None) -> np.ndarray:
    """Decode once and resize to the 224 x 224 model input: float32 RGB in [0, 255]."""
    return decode(path, min_side=min_side, size=INPUT_SIZE, limits=limits)


def header_size_of(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG or JPEG header, without decoding; None for other formats."""
    info = header_info(data)
    return (info["height"], info["width"]) if info else None


def header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the first 64 KiB of a PNG or JPEG file."""
    with open(path, "rb") as f:
        return header_size_of(f.read(1 << 16))


SCALED_DECODE_MIN_SIDE = 2 * INPUT_SIZE


def resize(img: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Resize to size x size (area interpolation when shrinking, as radiographs mostly are)."""
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class ImageLimits:
    """What a file may cost before covfeat decodes it: a file over a limit is skipped with a
    reason that names the limit and the flag that raises it.  The defaults are far beyond
    any real radiograph (the largest in the reproduction set is 4,248 x 3,480)."""

    max_pixels: int = 64_000_000
    max_file_mb: float = 256.0
    min_side: int = 64
    max_aspect: float = 4.0

    def check_file(self, path: Path) -> None:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise _unavailable(path, exc) from None
        if size > self.max_file_mb * 2**20:
            raise UnreadableImage(f"file of {size / 2**20:.0f} MB exceeds --max-file-mb {self.max_file_mb:g}")
        hw = header_size(path)
        if hw is not None:
            self.check_size(*hw)

    def check_size(self, h: int, w: int) -> None:
        if h * w > self.max_pixels:
            raise UnreadableImage(f"{w} x {h} = {h * w / 1e6:.0f} Mpx exceeds --max-pixels {self.max_pixels}")
        if min(h, w) < self.min_side:
            raise UnreadableImage(f"{w} x {h}: shorter side below --min-side {self.min_side}")
        if max(h, w) / max(min(h, w), 1) > self.max_aspect:
            raise UnreadableImage(f"{w} x {h}: aspect ratio {max(h, w) / max(min(h, w), 1):.1f} exceeds "
                                  f"--max-aspect {self.max_aspect:g}")


METADATA_FIELDS = ("height", "width", "channels", "bit_depth", "format", "file_bytes")


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def file_metadata(path: str | Path) -> dict:
    """What a file says about itself, without the pixels: height, width, channels, bit depth,
    format and size in bytes (PNG and JPEG from their headers; others by decoding).

    Raises
    ------
    UnreadableImage
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise UnreadableImage(f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    info = header_info(head)
    if info is not None:
        return {**info, "file_bytes": size}
    img = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UnreadableImage("not a decodable image (corrupt, truncated or not an image)")
    return {"height": img.shape[0], "width": img.shape[1], "channels": 1 if img.ndim == 2 else img.shape[2],
            "bit_depth": img.dtype.itemsize * 8, "format": path.suffix.lower().lstrip(".") or "other",
            "file_bytes": size}


cv2.setNumThreads(1)  # decoding runs in a thread pool beside the forward pass
