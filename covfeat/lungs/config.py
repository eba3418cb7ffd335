"""The settings of training a lungs model, each declared once with its flag, help and default
(``covfeat lungs fit`` builds its options from them).

The defaults were chosen on openist (275 radiographs, 2 CPU cores): see the README's lung
segmenter section for the held-out Dice and the time they give.
"""

from __future__ import annotations

from dataclasses import dataclass

from covfeat.core.settings import BOOL, Checked, integer, number, setting
from covfeat.lungs.model import INPUT_VERSION, check_architecture


@dataclass(frozen=True)
class LungsFitConfig(Checked):
    size: int = setting(256, integer(32, 1024), flag="--size",
                        help="Side of the network's square input, in pixels (a multiple of 2^depth)")
    filters: int = setting(8, integer(1, 256), flag="--filters",
                           help="Channels of the U-Net's first level (doubling at each level below)")
    depth: int = setting(4, integer(1, 6), flag="--depth", help="Poolings of the U-Net")
    epochs: int = setting(20, integer(1), flag="--epochs", help="Most epochs to train")
    patience: int = setting(6, integer(1), flag="--patience",
                            help="Stop after this many epochs without a better validation Dice")
    batch_size: int = setting(8, integer(1), flag="--batch-size", help="Images per step")
    learning_rate: float = setting(2e-3, number(0, 1, lo_open=True), flag="--learning-rate",
                                   help="Adam's starting rate (cosine decay to 5% of it)")
    holdout: float = setting(0.2, number(0, 1, lo_open=True, hi_open=True), flag="--holdout",
                             help="Share of the images held out and scored once, at the end")
    validation: float = setting(0.15, number(0, 1, lo_open=True, hi_open=True), flag="--validation",
                                help="Share of the training images that picks the epoch")
    augment: bool = setting(True, BOOL, flag="--augment",
                            help="Small rotations, shifts, zooms, brightness, contrast and gamma (never left/right flips)")
    threshold: float = setting(0.5, number(0, 1, lo_open=True, hi_open=True), flag="--threshold",
                               help="Probability above which a pixel is lung")
    seed: int = setting(0, integer(0), flag="--seed", help="Seed of the split, the augmentation and the weights")

    def _check(self) -> None:
        check_architecture(self.architecture())

    def architecture(self) -> dict:
        """The settings a lungs folder keeps to build its network again (and to threshold)."""
        return {"size": self.size, "filters": self.filters, "depth": self.depth, "threshold": self.threshold,
                "input_version": INPUT_VERSION}
