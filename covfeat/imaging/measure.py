"""An image's size read from the bytes covfeat holds, before anything decodes them.

OpenCV picks its decoder by the file's first bytes, whatever its name, and allocates the
whole image before any limit of covfeat's could look at it; pydicom decodes every frame of a
DICOM.  So the dimensions are read first, from the very bytes that will be decoded, by the
parser of the format that will decode them: PNG and JPEG from their headers (the JPEG's whole
marker chain, resynchronised over junk bytes as libjpeg does), DICOM with pydicom's header
alone, and the other formats OpenCV reads with Pillow's plugin for that one format, which
reads only the header.  A format OpenCV would decode that none of these can measure is
reported as such, and the caller refuses it (:class:`covfeat.imaging.decode.ImageLimits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # markers without a length: TEM, RSTn, SOI, EOI

# The decoders OpenCV tries, by the signature each checks (its own list and order, loadsave.cpp):
# the format a file is decoded as, whatever its name.  Pillow's plugin for that format, where
# one exists, measures it.
_PILLOW = {"bmp": "BMP", "webp": "WEBP", "sunras": "SUN", "pxm": "PPM", "pfm": "PPM", "tiff": "TIFF",
           "jpeg2000": "JPEG2000", "gif": "GIF", "avif": "AVIF"}


def opencv_format(data: bytes) -> str | None:
    """The decoder OpenCV would pick for ``data`` (by its first bytes, as OpenCV does), or None
    when none of them recognises it (OpenCV cannot decode it)."""
    if data[:2] == b"BM":
        return "bmp"
    if data[:6] == b"#?RGBE" or data[:10] == b"#?RADIANCE":
        return "hdr"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] == b"\x59\xa6\x6a\x95":
        return "sunras"
    if len(data) >= 3 and data[:1] == b"P" and data[2:3].isspace():
        if data[1:2] in b"123456":
            return "pxm"
        if data[1:2] == b"7":
            return "pam"
        if data[1:2] in (b"F", b"f"):
            return "pfm"
    if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "tiff"
    if data[:4] == b"\x76\x2f\x31\x01":
        return "exr"
    if data[:12] == b"\0\0\0\x0cjP  \r\n\x87\n" or data[:4] == b"\xff\x4f\xff\x51":
        return "jpeg2000"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "avif"
    if data[:2] == b"\xff\x0a" or data[:12] == b"\0\0\0\x0cJXL \r\n\x87\n":
        return "jpegxl"
    return None


def is_dicom(data: bytes, suffix: str) -> bool:
    """A DICOM file: by name, or by the "DICM" after its 128-byte preamble."""
    return suffix.lower() in (".dcm", ".dicom") or data[128:132] == b"DICM"


def _jpeg_frame(data: bytes, i: int, marker: int) -> dict:
    return {"height": int.from_bytes(data[i + 3:i + 5], "big"), "width": int.from_bytes(data[i + 5:i + 7], "big"),
            "channels": data[i + 7] if i + 7 < len(data) else 0, "bit_depth": data[i + 2], "format": "jpeg"}


def _jpeg_header(data: bytes) -> dict | None:
    """The frame header of a JPEG, found by walking its marker chain through all of ``data``.
    Bytes between segments that are not a marker are skipped up to the next one, as libjpeg
    does (it only warns), so a junk byte before the frame header does not hide it."""
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            i += 1  # junk between segments: libjpeg's next_marker scans on
            continue
        while i < n and data[i] == 0xFF:
            i += 1  # fill bytes
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == 0x00 or marker in _STANDALONE:
            continue
        if i + 2 > n:
            return None
        if marker in _SOF:
            return _jpeg_frame(data, i, marker) if i + 7 <= n else None
        if marker == 0xDA:  # start of scan before any frame header: not a JPEG libjpeg decodes
            return None
        i += int.from_bytes(data[i:i + 2], "big")
    return None


def header_info(data: bytes) -> dict | None:
    """Height, width, channels, bit depth and format from a PNG or JPEG header, without
    decoding; None for other formats or when the header is not in ``data``."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        return {"height": int.from_bytes(data[20:24], "big"), "width": int.from_bytes(data[16:20], "big"),
                "channels": _PNG_CHANNELS.get(data[25], 0), "bit_depth": data[24], "format": "png"}
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    return None


@dataclass(frozen=True)
class Size:
    """What an image will cost to decode: its sides, the frames decoded, and its format."""

    height: int
    width: int
    frames: int
    format: str
    channels: int = 0
    bit_depth: int = 0


def _dicom_size(data: bytes) -> Size | None:
    try:
        import pydicom

        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        h, w = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        return Size(h, w, frames, "dicom", int(getattr(ds, "SamplesPerPixel", 1) or 1),
                    int(getattr(ds, "BitsAllocated", 0) or 0))
    except Exception:  # no pydicom, no header, no Rows/Columns: not measured
        return None


def _pillow_size(data: bytes, fmt: str) -> Size | None:
    """Pillow's plugin for ``fmt`` alone on the header (never Pillow's guess among all its
    formats, which could see another format in the same bytes than OpenCV does; and without
    Image.open's own bomb check, so a huge size is measured, not an exception)."""
    try:
        from PIL import Image

        Image.init()
        factory, accept = Image.OPEN[_PILLOW[fmt]]
        if accept is not None and not accept(data[:16]):
            return None
        im = factory(BytesIO(data))
        w, h = im.size
        depth = 16 if im.mode.startswith("I;16") else 32 if im.mode in ("I", "F") else 1 if im.mode == "1" else 8
        return Size(int(h), int(w), 1, fmt, len(im.getbands()), depth)
    except Exception:  # Pillow without that plugin, or a header it cannot parse: not measured
        return None


def measure(data: bytes, suffix: str = "") -> tuple[Size | None, str | None]:
    """(size, format) of the image in ``data``, read without decoding; size None when it cannot
    be measured, format None when no decoder of OpenCV's recognises the bytes at all."""
    if is_dicom(data, suffix):
        return _dicom_size(data), "dicom"
    fmt = opencv_format(data)
    if fmt in ("png", "jpeg"):
        info = header_info(data)
        if info is None:
            return None, fmt
        return Size(info["height"], info["width"], 1, fmt, info["channels"], info["bit_depth"]), fmt
    if fmt in _PILLOW:
        return _pillow_size(data, fmt), fmt
    return None, fmt
