"""The command line: parse options, call the library, turn covfeat errors into one line.

No logic lives only here; each command calls a function of the library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer  # noqa: E402

from .errors import CovfeatError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer-learning COVID-19 vs NORMAL chest-radiograph classifiers on a cached feature store.")


@app.callback()
def _root():
    """covfeat: extract -> fit-head -> report; audit and explain keep the numbers honest."""


def _fail(msg: str, code: int = 1):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Run a library call; expected errors become one line on stderr and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except CovfeatError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; finished work is kept, run the same command again to resume.", 130)


def _progress() -> bool:
    return not os.environ.get("COVFEAT_NO_PROGRESS")


Backbone = Annotated[str, typer.Option("--backbone", "-b", help="inception_v3 | inception_resnet_v2 | densenet201 | resnet101_v2")]
Data = Annotated[Optional[list[Path]], typer.Option("--data", "-d", exists=True, resolve_path=True,
                                                   help="Image source (repeatable): Cohen folder, Kermany folder, class folders or manifest CSV. Default: the bundled sample.")]
CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Where feature caches live.")]
Weights = Annotated[str, typer.Option("--weights", help="imagenet (Keras download/cache), none (random init, NOT PRETRAINED) or a weights FILE.")]


def extract_options(backbone, weights, preprocess, augment, seed, views, val, test, split_by, dtype, batch_size, workers,
                    occlude: str = "none"):
    from .extract import ExtractConfig
    from .occlusion import Occlusion
    from .split import SplitConfig

    occl = Occlusion() if occlude == "none" else Occlusion(kind="box") if occlude == "box" else Occlusion(kind="masks", masks=occlude)
    return ExtractConfig(
        backbone=backbone, weights=weights, preprocess=preprocess, augment=augment, seed=seed,
        views=tuple(v for v in views.split(",") if v), split=SplitConfig(val=val, test=test, by=split_by, seed=seed),
        dtype=dtype, batch_size=batch_size, workers=workers, occlusion=occl,
    )


@app.command()
def extract(
    backbone: Backbone,
    data: Data = None,
    weights: Weights = "imagenet",
    preprocess: Annotated[str, typer.Option(help="paper ([0,1] after BGR->RGB) or backbone (its preprocess_input).")] = "paper",
    augment: Annotated[int, typer.Option(help="Augmented (jittered) views stored per image, besides the original.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the jitter, the split and a random-init backbone.")] = 0,
    views: Annotated[str, typer.Option(help="Cohen radiographic views to keep, comma-separated.")] = "PA",
    val: Annotated[float, typer.Option(help="Validation share.")] = 0.1,
    test: Annotated[float, typer.Option(help="Test share.")] = 0.3,
    split_by: Annotated[str, typer.Option(help="patient (no patient in two splits) or image (the paper's naive split).")] = "patient",
    dtype: Annotated[str, typer.Option(help="float16 or float32 storage.")] = "float16",
    batch_size: Annotated[int, typer.Option(help="Forward-pass batch size.")] = 16,
    workers: Annotated[int, typer.Option(help="Decoding threads.")] = 2,
    occlude: Annotated[str, typer.Option(help="none, box (a central lung box) or a folder of lung masks: blanked before extraction.")] = "none",
    cache_dir: CacheDir = Path("cache"),
):
    """Run one frozen backbone over the radiographs and cache the pre-pool feature maps (HDF5).

    The last line on stdout is the cache's path. Re-running a finished command does no work;
    re-running an interrupted one resumes it.
    """
    from . import extract as ex

    cfg = _guard(extract_options, backbone, weights, preprocess, augment, seed, views, val, test, split_by, dtype,
                 batch_size, workers, occlude)
    path = _guard(ex.extract, data, cfg, cache_dir, progress=_progress())
    typer.echo(str(path))


def main():
    app()


if __name__ == "__main__":
    main()
