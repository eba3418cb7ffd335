"""The command line: parse options, call the library, turn covfeat errors into one line.

No logic lives only here; each command calls a function of the library.
"""

from __future__ import annotations

import os
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
                    occlude: str = "none", full_decode: bool = False):
    from .extract import ExtractConfig
    from .occlusion import Occlusion
    from .split import SplitConfig

    occl = Occlusion() if occlude == "none" else Occlusion(kind="box") if occlude == "box" else Occlusion(kind="masks", masks=occlude)
    return ExtractConfig(
        backbone=backbone, weights=weights, preprocess=preprocess, augment=augment, seed=seed,
        views=tuple(v for v in views.split(",") if v), split=SplitConfig(val=val, test=test, by=split_by, seed=seed),
        dtype=dtype, batch_size=batch_size, workers=workers, occlusion=occl, scaled_decode=not full_decode,
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
    full_decode: Annotated[bool, typer.Option(help="Decode large JPEGs at full size (default: libjpeg's scaled decoding to >= 448 px, then the same resize).")] = False,
    cache_dir: CacheDir = Path("cache"),
):
    """Run one frozen backbone over the radiographs and cache the pre-pool feature maps (HDF5).

    The last line on stdout is the cache's path. Re-running a finished command does no work;
    re-running an interrupted one resumes it.
    """
    from . import extract as ex

    cfg = _guard(extract_options, backbone, weights, preprocess, augment, seed, views, val, test, split_by, dtype,
                 batch_size, workers, occlude, full_decode)
    path = _guard(ex.extract, data, cfg, cache_dir, progress=_progress())
    typer.echo(str(path))


HEAD_FLAGS = ("dropout", "epochs", "batch_size", "learning_rate", "momentum", "balance", "smote_k", "seed",
              "dense_units", "activity_l1", "activity_l2")


def head_config(config_file: Optional[Path], **flags):
    """Defaults (the paper) <- config file keys <- flags given on the command line."""
    import dataclasses
    import json as _json

    from .errors import ConfigError
    from .head import HeadConfig

    values = {}
    if config_file is not None:
        text = config_file.read_text()
        if config_file.suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            values = _json.loads(text)
        known = {f.name for f in dataclasses.fields(HeadConfig)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"{config_file}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}.")
    values.update({k: v for k, v in flags.items() if v is not None})
    return HeadConfig(**values)


def _cache_arg(cache: Optional[Path], backbone: Optional[str], cache_dir: Path) -> Path:
    from .cache import find_latest_cache

    if cache is not None:
        return cache
    if backbone is None:
        _fail("pass --cache FILE or --backbone NAME (the newest complete cache of it in --cache-dir).")
    return _guard(find_latest_cache, cache_dir, backbone)


@app.command("fit-head")
def fit_head(
    cache: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, resolve_path=True, help="Feature cache (.h5).")] = None,
    backbone: Annotated[Optional[str], typer.Option("--backbone", "-b", help="Use the newest complete cache of this backbone.")] = None,
    cache_dir: CacheDir = Path("cache"),
    runs_dir: Annotated[Path, typer.Option(help="Where run folders are written.")] = Path("runs"),
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="JSON or TOML file of head settings (keys as the flags, with _).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="[default: 100]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="[default: 8]")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="SGD learning rate [default: 1e-4]")] = None,
    momentum: Annotated[Optional[float], typer.Option(help="SGD momentum [default: 0.5]")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="[default: 0.5 inception_v3/densenet201, 0.2 resnet101_v2/inception_resnet_v2]")] = None,
    dense_units: Annotated[Optional[int], typer.Option(help="[default: 128]")] = None,
    activity_l1: Annotated[Optional[float], typer.Option(help="[default: 0.001]")] = None,
    activity_l2: Annotated[Optional[float], typer.Option(help="[default: 0.001]")] = None,
    balance: Annotated[Optional[str], typer.Option(help="smote | none | class-weight [default: smote]")] = None,
    smote_k: Annotated[Optional[int], typer.Option(help="SMOTE neighbours, reduced for a small minority [default: 5]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="[default: 0]")] = None,
    target_recall: Annotated[Optional[float], typer.Option(help="Pick the threshold on validation rows to reach this COVID-19 recall.")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds (0: the cache's own split).")] = 0,
    repeats: Annotated[int, typer.Option(help="Cross-validation repeats.")] = 1,
    memory_budget: Annotated[float, typer.Option(help="GiB of training maps held in memory; above it they are streamed from HDF5.")] = 8.0,
):
    """Train the paper's head on cached features (SMOTE in feature space, fresh views each epoch).

    The last line on stdout is the run folder.
    """
    from . import train

    cfg = _guard(head_config, config, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                 momentum=momentum, dropout=dropout, dense_units=dense_units, activity_l1=activity_l1,
                 activity_l2=activity_l2, balance=balance, smote_k=smote_k, seed=seed)
    path = _cache_arg(cache, backbone, cache_dir)
    if folds:
        run = _guard(train.cross_validate, path, cfg, runs_dir, folds=folds, repeats=repeats,
                     target_recall=target_recall, memory_budget_gb=memory_budget, progress=_progress())
    else:
        run = _guard(train.fit_head, path, cfg, runs_dir, target_recall=target_recall,
                     memory_budget_gb=memory_budget, progress=_progress())
    typer.echo(str(run))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(exists=True, file_okay=False, help="Run folders from fit-head.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for table2.md/.csv/.json and the PNG figures [default: the first run folder]")] = None,
):
    """Print the paper's Table 2 for the runs side by side; write Markdown, CSV, JSON and figures."""
    from . import report as rp

    typer.echo(_guard(rp.report, runs, out if out is not None else runs[0]))


@app.command()
def predict(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    images: Annotated[list[Path], typer.Argument(exists=True, help="Image files or folders.")],
    out: Annotated[Optional[Path], typer.Option(help="Write the table to FILE.csv or FILE.json.")] = None,
):
    """P(COVID-19) for new radiographs, with the run's own preprocessing, backbone and head."""
    import csv as _csv
    import json as _json

    from . import predict as pr

    rows = _guard(pr.predict, run, images)
    width = max([len(r["path"]) for r in rows] + [4])
    typer.echo(f"{'path'.ljust(width)}  p_covid  label")
    for r in rows:
        if r["error"]:
            typer.echo(f"{r['path'].ljust(width)}  skipped: {r['error']}")
        else:
            typer.echo(f"{r['path'].ljust(width)}  {r['p_covid']:.4f}   {r['label']}")
    bad = sum(1 for r in rows if r["error"])
    if bad:
        typer.echo(f"{bad} of {len(rows)} image(s) could not be read; see 'skipped' above.", err=True)
    if out is not None:
        if out.suffix == ".json":
            out.write_text(_json.dumps(rows, indent=2))
        else:
            with open(out, "w", newline="") as f:
                w = _csv.DictWriter(f, fieldnames=["path", "p_covid", "label", "error"])
                w.writeheader()
                w.writerows(rows)
        typer.echo(str(out))


@app.command()
def export(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    out: Annotated[Path, typer.Option(help="Output .keras file.")],
):
    """One Keras model (preprocessing, backbone, head): 224x224 RGB in [0, 255] -> (p_normal, p_covid)."""
    from . import predict as pr

    typer.echo(str(_guard(pr.export, run, out)))


@app.command()
def reproduce(
    data: Data = None,
    weights: Weights = "imagenet",
    augment: Annotated[int, typer.Option(help="Jittered views per image.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of jitter, split, random init and head.")] = 0,
    split_by: Annotated[str, typer.Option(help="patient or image (the paper's naive split).")] = "patient",
    epochs: Annotated[int, typer.Option(help="Head epochs (the paper: 100).")] = 100,
    backbones: Annotated[str, typer.Option(help="Comma-separated, default the paper's four.")] = "inception_v3,inception_resnet_v2,densenet201,resnet101_v2",
    cache_dir: CacheDir = Path("cache"),
    runs_dir: Annotated[Path, typer.Option(help="Where run folders are written.")] = Path("runs"),
):
    """The paper in one command: extract + fit-head + report for the four backbones, and its Table 2
    beside the measured one. Resumes where it stopped (each stage is cached)."""
    from . import reproduce as rp
    from .head import HeadConfig

    base = _guard(extract_options, "inception_v3", weights, "paper", augment, seed, "PA", 0.1, 0.3, split_by,
                  "float16", 16, 2, "none", False)
    names = [b for b in backbones.split(",") if b]
    runs, _ = _guard(rp.reproduce, data, base, HeadConfig(epochs=epochs, seed=seed), cache_dir, runs_dir, names,
                     progress=_progress())
    out = runs_dir / f"reproduce-report-{'-'.join(sorted(p.name.split('-')[-1] for p in runs.values()))}"
    typer.echo(_guard(rp.full_report, runs, out))
    typer.echo(str(out))


@app.command()
def audit(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    occlude: Annotated[str, typer.Option(help="box (a central lung box) or a folder of lung masks named like the images.")] = "box",
    external: Annotated[Optional[list[Path]], typer.Option(exists=True, help="Another labelled source to score the run on (repeatable).")] = None,
    cache_dir: CacheDir = Path("cache"),
):
    """Shortcut audit: occlusion probe, source probe, and (with --external) external validation.

    Verdicts are printed and kept in RUN/audit.json; `covfeat report RUN` shows them.
    """
    from . import audit as au
    from .occlusion import Occlusion

    occl = Occlusion(kind="box") if occlude == "box" else Occlusion(kind="masks", masks=occlude)
    res = _guard(au.audit, run, occlusion=occl, external=external, cache_dir=cache_dir, progress=_progress())
    typer.echo(au.summary(res))
    typer.echo(str(run / "audit.json"))


@app.command()
def explain(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    images: Annotated[list[Path], typer.Argument(exists=True, help="Image files or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the heat-map PNGs.")] = Path("gradcam"),
):
    """Grad-CAM heat maps (one PNG per image) through the run's preprocessing, backbone and head."""
    from . import explain as ex

    rows = _guard(ex.explain, run, images, out)
    for r in rows:
        typer.echo(f"{r['path']}: skipped: {r['error']}" if r["error"] else f"{r['png']}  p_covid {r['p_covid']:.4f}")
    typer.echo(str(out))


def main():
    app()


if __name__ == "__main__":
    main()
