"""covfeat's decoding as TensorFlow ops, so an exported SavedModel can take image bytes.

A served model that takes decoded pixels leaves every client to re-implement covfeat's decoding
and resize, and a client that gets them slightly wrong gets train/serve skew (the classic
"everything is COVID" report).  :func:`decode_images` rebuilds
:func:`covfeat.imaging.decode.load` (what :class:`covfeat.extraction.images.InputPipeline`
feeds a whole-image run's model) from TensorFlow ops alone, so it lives in a SavedModel graph
that loads where covfeat is not installed:

- PNG: 8-bit as is; 16-bit decoded as uint16 and stretched by the image's own min and max onto
  [0, 255] (never truncated), as covfeat does; the bit depth is read from the PNG header.
- JPEG: libjpeg's accurate integer IDCT (OpenCV's default); a JPEG whose shorter side allows
  it is decoded at 1/8, 1/4 or 1/2 scale in the DCT domain, the largest factor keeping the
  shorter side >= 448, exactly covfeat's rule (``--full-decode`` runs: ``scaled_decode=False``).
- other formats: ``tf.io.decode_image`` (BMP, GIF's first frame), 8-bit.
- channels: greyscale (and grey + alpha) repeated to RGB; RGBA's alpha dropped, not composited.
- resize to 224 x 224 as covfeat's ``cv2.resize`` does: INTER_AREA when either side shrinks,
  which averages (``tf.image.resize`` "area") when no side grows, and otherwise blends two
  pixels per axis with resize.cpp's own ``area_mode`` weights (rebuilt here with gathers);
  INTER_LINEAR (``tf.image.resize`` "bilinear", half-pixel centres) when both sides grow.  Then
  rounded to the integer the image was decoded as, since covfeat resizes the uint8 / uint16
  array; 16-bit images are stretched after the resize, as covfeat does.

What differs, measured by :func:`pixel_gap` (tests/test_serving_decode.py): TensorFlow's area
and bilinear kernels are not OpenCV's bit for bit (OpenCV's bilinear is fixed-point), so a
pixel may land one grey level away; OpenCV applies a JPEG's EXIF orientation when it
decodes at reduced scale, TensorFlow never does; covfeat refuses a JPEG without its end marker
and checks its size limits before decoding, the graph does neither (an undecodable string fails
the call).  A ``--lungs`` run's model needs its segmenter first and is not exported at all.

Only :func:`pixel_gap` and its helpers import covfeat's own decoding; :func:`decode_images`
uses nothing but TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

SIZE = 224
MIN_SIDE = 2 * SIZE  # covfeat.imaging.decode.SCALED_DECODE_MIN_SIDE (asserted in the tests)
FACTORS = (8, 4, 2)  # libjpeg's scaled decodes covfeat tries, largest first

# The largest |pixel difference| from covfeat's InputPipeline pixels, in grey levels of [0, 255],
# measured by pixel_gap on the bundled sample and on ../shared/data/covid-cxr (tests pin them).
SAMPLE_BOUND = 1.0
SHARED_BOUND = 1.0

PIXELS = {
    "name": "pixels",
    "shape": [None, SIZE, SIZE, 3],
    "dtype": "float32",
    "channel_order": "RGB",
    "range": [0.0, 255.0],
    "made_by": ("covfeat's decoding (OpenCV; greyscale repeated to RGB, alpha dropped, 16-bit stretched by the "
                "image's own min and max onto [0, 255]; JPEGs whose shorter side allows it decoded at 1/8, 1/4 or "
                "1/2 scale keeping it >= 448), then resized to 224 x 224 with OpenCV INTER_AREA when either side "
                "shrinks, INTER_LINEAR when both grow; not scaled: the model applies the backbone's scaling"),
    "reference": "covfeat.extraction.images.InputPipeline(...).decode(path)",
}

DECODING = {
    "name": "image_bytes",
    "shape": [None],
    "dtype": "string",
    "content": "one encoded image file per element (PNG or JPEG; BMP and GIF's first frame through "
               "tf.io.decode_image)",
    "channels": "greyscale and grey+alpha repeated to RGB; RGBA and RGB+alpha: alpha dropped (not composited)",
    "bit_depth": ("8-bit as is; 16-bit PNG (depth from its header) decoded as uint16 and stretched by the image's own "
                  "min and max onto [0, 255] after the resize; a constant 16-bit image becomes 0"),
    "jpeg": (f"tf.io.decode_jpeg, dct_method INTEGER_ACCURATE; reduced-scale decoding (ratio 8, 4 or 2, the largest "
             f"with min(height, width) // ratio >= {MIN_SIDE}), as covfeat's default scaled decode"),
    "resize": (f"to {SIZE} x {SIZE} as OpenCV's cv2.resize: tf.image.resize method 'area' when both sides are >= "
               f"{SIZE} and one > {SIZE}; OpenCV's INTER_AREA two-tap weights (resize.cpp area_mode) when one side "
               f"shrinks and the other grows; 'bilinear' (half-pixel centres) when both are <= {SIZE}; rounded to "
               "integers, as covfeat resizes the decoded uint8/uint16 array"),
    "output": PIXELS["channel_order"] + " float32 in [0, 255], shape [None, 224, 224, 3]: the 'pixels' input",
    "differs_from_covfeat": ["TensorFlow's area and bilinear kernels are not OpenCV's bit for bit, and OpenCV's "
                             "uint8 bilinear is fixed-point: a pixel may land one grey level away",
                             "EXIF orientation: OpenCV applies it on reduced-scale JPEG decodes, TensorFlow never",
                             "no size limits and no truncated-JPEG check before decoding; an undecodable element "
                             "fails the whole call"],
    "max_abs_pixel_difference": {"bundled_sample": SAMPLE_BOUND, "shared_radiographs": SHARED_BOUND},
}


def decoding_for(scaled_decode: bool) -> dict:
    """:data:`DECODING` as a run decodes: a ``--full-decode`` run never decodes at reduced scale
    (pass the same ``scaled_decode`` to :func:`decode_images`)."""
    if scaled_decode:
        return dict(DECODING)
    return {**DECODING, "jpeg": "tf.io.decode_jpeg, dct_method INTEGER_ACCURATE, at full size (the run's --full-decode)"}


def _channels3(img):
    """(h, w, c) with c in 1..4 -> (h, w, 3): grey repeated, alpha dropped, as covfeat does."""
    import tensorflow as tf

    c = tf.shape(img)[2]
    return tf.cond(c >= 3, lambda: img[:, :, :3], lambda: tf.tile(img[:, :, :1], [1, 1, 3]))


def _jpeg(data, scaled_decode: bool):
    import tensorflow as tf

    def at(ratio):
        return lambda: _channels3(tf.io.decode_jpeg(data, channels=0, ratio=ratio, dct_method="INTEGER_ACCURATE"))

    if not scaled_decode:
        return at(1)()
    shape = tf.io.extract_jpeg_shape(data)
    short = tf.minimum(shape[0], shape[1])
    # branch index: 0 -> full size, 1 -> 1/2, 2 -> 1/4, 3 -> 1/8 (the largest factor that fits)
    index = tf.reduce_sum(tf.cast(tf.stack([short // f >= MIN_SIDE for f in FACTORS]), tf.int32))
    return tf.switch_case(index, [at(1), at(2), at(4), at(8)])


def _area_taps(n):
    """OpenCV's INTER_AREA taps along one axis of ``n`` pixels when the image grows along some
    axis: two pixels per output (sx, sx + 1) and the weight of the second, as resize.cpp's
    ``area_mode`` computes them, borders clamped as it does."""
    import tensorflow as tf

    inv = tf.cast(SIZE, tf.float64) / tf.cast(n, tf.float64)
    dx = tf.range(SIZE, dtype=tf.float64)
    sx = tf.floor(dx * (1.0 / inv))  # as OpenCV rounds it: dx / inv can land just below an integer
    fx = tf.cast((dx + 1) - (sx + 1) * inv, tf.float32)
    fx = tf.where(fx <= 0, 0.0, fx - tf.floor(fx))
    last = tf.cast(n - 1, tf.float64)
    fx = tf.where(tf.logical_or(sx < 0, sx >= last), 0.0, fx)
    sx = tf.cast(tf.clip_by_value(sx, 0.0, last), tf.int32)
    return sx, tf.minimum(sx + 1, n - 1), fx


def _opencv_area_upscale(img):
    """cv2.resize(INTER_AREA) to SIZE x SIZE of an image that grows along one side and shrinks
    along the other: OpenCV does not average then, it blends two pixels per axis."""
    import tensorflow as tf

    shape = tf.shape(img)
    y0, y1, fy = _area_taps(shape[0])
    rows = tf.gather(img, y0) * (1 - fy)[:, None, None] + tf.gather(img, y1) * fy[:, None, None]
    x0, x1, fx = _area_taps(shape[1])
    return tf.gather(rows, x0, axis=1) * (1 - fx)[None, :, None] + tf.gather(rows, x1, axis=1) * fx[None, :, None]


def decode_image(data, scaled_decode: bool = True):
    """One encoded image (scalar tf.string) -> float32 (224, 224, 3) RGB in [0, 255], TF ops only."""
    import tensorflow as tf

    head = tf.strings.substr(data, 0, 8)
    is_png = tf.equal(head, b"\x89PNG\r\n\x1a\n")
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    # PNG bit depth: byte 24 (signature 8, IHDR length 4 and type 4, width 4, height 4)
    depth = tf.cond(tf.logical_and(is_png, tf.strings.length(data) > 24),
                    lambda: tf.cast(tf.io.decode_raw(tf.strings.substr(data, 24, 1), tf.uint8)[0], tf.int32),
                    lambda: tf.constant(8))
    is16 = tf.logical_and(is_png, tf.equal(depth, 16))

    def png16():
        return _channels3(tf.cast(tf.io.decode_png(data, channels=0, dtype=tf.uint16), tf.float32))  # Tile has no uint16

    def png8():
        return tf.cast(_channels3(tf.io.decode_png(data, channels=0, dtype=tf.uint8)), tf.float32)

    def jpeg():
        return tf.cast(_jpeg(data, scaled_decode), tf.float32)

    def other():
        img = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
        return tf.cast(_channels3(img), tf.float32)

    img = tf.case([(is16, png16), (is_png, png8), (is_jpeg, jpeg)], default=other, exclusive=False)
    img.set_shape([None, None, 3])
    shape = tf.shape(img)
    shrink = tf.logical_or(shape[0] > SIZE, shape[1] > SIZE)
    both = tf.logical_and(shape[0] >= SIZE, shape[1] >= SIZE)  # OpenCV averages only when no side grows
    out = tf.case([(tf.logical_and(shrink, both), lambda: tf.image.resize(img, (SIZE, SIZE), method="area")),
                   (shrink, lambda: _opencv_area_upscale(img))],
                  default=lambda: tf.image.resize(img, (SIZE, SIZE), method="bilinear"), exclusive=False)
    out = tf.round(out)  # covfeat resizes the uint8 / uint16 array: OpenCV rounds to it
    lo = tf.reduce_min(img)
    hi = tf.reduce_max(img)
    scale = tf.where(hi > lo, tf.cast(255.0 / (tf.cast(hi, tf.float64) - tf.cast(lo, tf.float64)), tf.float32), 0.0)
    out = tf.cond(is16, lambda: (out - lo) * scale, lambda: out)
    return tf.ensure_shape(out, (SIZE, SIZE, 3))


def decode_images(image_bytes, scaled_decode: bool = True):
    """A batch of encoded images, tf.string (None,) -> float32 (None, 224, 224, 3) RGB in [0, 255]:
    covfeat's decoding and resize as TensorFlow ops (see the module's docstring and
    :data:`DECODING`), usable inside a tf.function and a SavedModel without covfeat."""
    import tensorflow as tf

    return tf.map_fn(lambda d: decode_image(d, scaled_decode), image_bytes,
                     fn_output_signature=tf.TensorSpec((SIZE, SIZE, 3), tf.float32))


def file_kind(path: str | Path, scaled_decode: bool = True) -> str:
    """What kind of file ``path`` is for decoding: format, bit depth, channels, reduced scale."""
    from covfeat.imaging.decode import file_metadata

    m = file_metadata(path)
    kind = f"{m['format']} {m['bit_depth']}-bit {m['channels']}ch"
    if m["format"] == "jpeg" and scaled_decode:
        short = min(m["height"], m["width"])
        factor = next((f for f in FACTORS if short // f >= MIN_SIDE), 1)
        if factor > 1:
            kind += f" 1/{factor} scale"
    if max(m["height"], m["width"]) > SIZE and min(m["height"], m["width"]) < SIZE:
        kind += " (shrinks one side, grows the other)"
    elif max(m["height"], m["width"]) <= SIZE:
        kind += " (upscaled)"
    return kind


def pixel_gap(paths, pipeline=None, batch: int = 16) -> list[dict]:
    """Per file: |decode_images(bytes) - InputPipeline pixels| (max and mean, grey levels), its
    kind (:func:`file_kind`); ``pipeline`` defaults to a
    whole-image run's (no occlusion, scaled decode, default limits)."""
    import numpy as np
    import tensorflow as tf

    if pipeline is None:
        from covfeat.extraction.backbones import get_backbone
        from covfeat.extraction.images import InputPipeline

        pipeline = InputPipeline(get_backbone("inception_v3").scaling_for("paper"))
    fn = tf.function(lambda b: decode_images(b, pipeline.scaled_decode))
    rows = []
    paths = [Path(p) for p in paths]
    for s in range(0, len(paths), batch):
        chunk = paths[s:s + batch]
        got = fn(tf.constant([p.read_bytes() for p in chunk])).numpy()
        for p, g in zip(chunk, got):
            want = pipeline.decode(p)
            d = np.abs(g.astype(np.float64) - want.astype(np.float64))
            rows.append({"path": str(p), "kind": file_kind(p, pipeline.scaled_decode), "max": float(d.max()),
                         "mean": float(d.mean())})
    return rows


def by_kind(rows: list[dict]) -> dict:
    """{kind: {"files", "max", "mean"}}: the largest and the mean gap per kind of file."""
    out: dict = {}
    for r in rows:
        k = out.setdefault(r["kind"], {"files": 0, "max": 0.0, "mean": 0.0})
        k["files"] += 1
        k["max"] = max(k["max"], r["max"])
        k["mean"] += r["mean"]
    for k in out.values():
        k["mean"] /= k["files"]
    return out
