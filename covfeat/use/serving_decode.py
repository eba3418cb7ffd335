"""Stand-in for e2's in-graph decoding of image bytes (replaced at merge): the names export
uses, with the plain decoding issue 21 describes, and no claim of fidelity to InputPipeline."""

from __future__ import annotations

SIZE = 224

DECODING = {"decode": "tf.io.decode_image(channels=3, expand_animations=False): PNG, JPEG, GIF, BMP to RGB",
            "resize": f"tf.image.resize(method='area') to {SIZE} x {SIZE}", "dtype": "float32"}

PIXELS = {"shape": [None, SIZE, SIZE, 3], "dtype": "float32", "channels": "RGB", "range": [0, 255],
          "decoding": "covfeat's InputPipeline.decode: the file decoded to RGB, then OpenCV area resize to "
                      f"{SIZE} x {SIZE}"}


def decode_images(image_bytes):
    """tf.string (None,) -> float32 (None, 224, 224, 3) RGB in [0, 255]; TF ops only."""
    import tensorflow as tf

    def one(b):
        img = tf.io.decode_image(b, channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        return tf.image.resize(tf.cast(img, tf.float32), (SIZE, SIZE), method="area")

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec((SIZE, SIZE, 3), tf.float32))
