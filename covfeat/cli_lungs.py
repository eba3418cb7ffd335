"""``covfeat lungs``: train a lung-field segmenter from masks, and predict masks with it.

A thin layer like cli.py: the options of ``fit`` come from the declarations of
:class:`~covfeat.lungs.config.LungsFitConfig` (flag, help, default), and each command calls
one library function (:func:`~covfeat.lungs.fit.fit_lungs`,
:func:`~covfeat.lungs.predict.predict_masks`), its errors turned into one line.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from covfeat.clikit import check, guard
from covfeat.core.settings import default_of, help_text
from covfeat.lungs.config import LungsFitConfig

lungs_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                        help="The lung-field segmenter: train it from image/mask pairs, predict lung masks.")

_FIT = {f.name: f for f in fields(LungsFitConfig)}


def _opt(name: str):
    """The option of a LungsFitConfig field, from its declaration (a bool one as --x/--no-x)."""
    flag = _FIT[name].metadata["flag"]
    if isinstance(default_of(_FIT[name]), bool):
        flag = f"{flag}/--no-{flag[2:]}"
    return typer.Option(flag, help=help_text(_FIT[name]))


def _d(name: str):
    return default_of(_FIT[name])


@lungs_app.command("fit")
def fit(
    images: Annotated[Path, typer.Option("--images", help="Folder of radiographs")],
    masks: Annotated[Path, typer.Option("--masks", help="Folder of binary lung masks, one per image, of the same file "
                                                       "stem and size")],
    out: Annotated[Path, typer.Option("--out", help="The lungs folder to write (DIR-2... if it exists)")] = Path("lungs"),
    size: Annotated[int, _opt("size")] = _d("size"),
    filters: Annotated[int, _opt("filters")] = _d("filters"),
    depth: Annotated[int, _opt("depth")] = _d("depth"),
    epochs: Annotated[int, _opt("epochs")] = _d("epochs"),
    patience: Annotated[int, _opt("patience")] = _d("patience"),
    batch_size: Annotated[int, _opt("batch_size")] = _d("batch_size"),
    learning_rate: Annotated[float, _opt("learning_rate")] = _d("learning_rate"),
    holdout: Annotated[float, _opt("holdout")] = _d("holdout"),
    validation: Annotated[float, _opt("validation")] = _d("validation"),
    augment: Annotated[bool, _opt("augment")] = _d("augment"),
    threshold: Annotated[float, _opt("threshold")] = _d("threshold"),
    seed: Annotated[int, _opt("seed")] = _d("seed"),
):
    """Train a lung segmenter (a small U-Net) on image/mask pairs matched by file stem; report
    its Dice and IoU on held-out images."""
    from covfeat.lungs.fit import fit_lungs

    config = check(LungsFitConfig, size=size, filters=filters, depth=depth, epochs=epochs, patience=patience,
                   batch_size=batch_size, learning_rate=learning_rate, holdout=holdout, validation=validation,
                   augment=augment, threshold=threshold, seed=seed)
    result = guard(fit_lungs, images, masks, out, config, log=typer.echo)
    h, t = result.info["heldout"], result.info["training"]
    for name in ("dice", "iou"):
        s = h[name]
        typer.echo(f"held-out {name.replace('dice', 'Dice').replace('iou', 'IoU')} on {h['images']} images: mean "
                   f"{s['mean']:.4f}, median {s['median']:.4f}, worst {s['worst']['value']:.4f} ({s['worst']['image']})")
    typer.echo(f"best epoch {t['best_epoch']} of {t['epochs_run']}; {t['seconds']['wall']:.0f} s wall, "
               f"{t['seconds']['cpu']:.0f} s CPU")
    typer.echo(f"lungs model: {result.folder}")


@lungs_app.command("predict")
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively)")],
    model: Annotated[Path, typer.Option("--model", help="A lungs folder made by `covfeat lungs fit`")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the masks, masks.csv and contact_sheet.png")] = Path(
        "lung_masks"),
):
    """Write a lung mask (PNG, 0/255, the image's own size) for every image, and a contact sheet."""
    from covfeat.lungs.predict import predict_masks
    from covfeat.lungs.segment import load_segmenter

    segmenter = guard(load_segmenter, model, tensorflow=False)
    result = guard(predict_masks, segmenter, inputs, out, say=typer.echo)
    typer.echo(f"{len(result.written)} mask(s) in {out}" + (f", {len(result.skipped)} file(s) skipped"
                                                            if result.skipped else "")
               + (f"; contact sheet: {result.sheet}" if result.sheet else ""))
