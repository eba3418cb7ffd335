"""Decoding: file bytes -> pixels, below every stage that looks at an image."""
