"""The lung-field segmenter: a small U-Net the user trains from image/mask pairs, kept in a
lungs folder (``lungs.json`` + weights), and the masks it predicts.  Its architecture and
file format (``model``), how its probabilities become a mask (``segment``), how image/mask
pairs are found and checked (``data``), how it is trained and scored (``fit``, ``config``),
and how a mask changes an image (``apply``).  It sits above decoding (so it sees the pixels
extraction sees) and below extraction (which uses it)."""
