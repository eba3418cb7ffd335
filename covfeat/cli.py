"""The command line: parse options, call the library, turn covfeat errors into one line.

No logic lives only here; each command calls a function of the library.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer  # noqa: E402

from covfeat.core.errors import CovfeatError  # noqa: E402
from covfeat.core.quiet import import_tensorflow  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer-learning COVID-19 vs NORMAL chest-radiograph classifiers on a cached feature store.")


@app.callback()
def _root():
    """covfeat: extract -> fit-head -> report; audit and explain keep the numbers honest."""


def _fail(msg: str, code: int = 1):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _check(fn, *args, **kwargs):
    """Build or check settings (no TensorFlow): a bad value is one line, before any work."""
    try:
        return fn(*args, **kwargs)
    except CovfeatError as exc:
        _fail(str(exc))


def _guard(fn, *args, tensorflow: bool = True, **kwargs):
    """Run a library call; expected errors become one line on stderr and exit code 1.
    With ``tensorflow`` it is imported first, quietly, before library code could import it
    noisily (calls that may not need it import it quietly themselves)."""
    if tensorflow:
        import_tensorflow()
    try:
        return fn(*args, **kwargs)
    except CovfeatError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; finished work is kept, run the same command again to resume.", 130)


def _progress() -> bool:
    return not os.environ.get("COVFEAT_NO_PROGRESS")


def _backbone_help() -> str:
    from covfeat.extraction.backbones import REGISTRY

    return " | ".join(REGISTRY)


def _dropout_help() -> str:
    from covfeat.extraction.backbones import REGISTRY

    return "\\[default: the paper's rate: " + ", ".join(f"{n} {b.dropout:g}" for n, b in REGISTRY.items()) + "]"


Backbone = Annotated[str, typer.Option("--backbone", "-b", help=_backbone_help())]


Data = Annotated[Optional[list[Path]], typer.Option("--data", "-d", exists=True, resolve_path=True,
                                                   help="Image source (repeatable): Cohen folder, Kermany folder, class folders or manifest CSV. Default: the bundled sample.")]


CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Where feature caches live.")]


Weights = Annotated[str, typer.Option("--weights", help="imagenet (Keras download/cache), none (random init, NOT PRETRAINED) or a weights FILE.")]


RunsDir = Annotated[Path, typer.Option(help="Where run folders are written.")]


def _extract_config(**kw):
    from covfeat.extraction.config import ExtractConfig, OcclusionConfig

    kw["occlusion"] = OcclusionConfig.parse(kw.pop("occlude"))
    kw["scaled_decode"] = not kw.pop("full_decode")
    kw["views"] = tuple(v.strip() for v in kw["views"].split(",") if v.strip())
    return ExtractConfig(**kw)


@app.command()
def extract(
    backbone: Backbone,
    data: Data = None,
    weights: Weights = "imagenet",
    preprocess: Annotated[str, typer.Option(help="paper ([0,1] after BGR->RGB) or backbone (its own preprocess_input).")] = "paper",
    augment: Annotated[int, typer.Option(help="Augmented (jittered) views stored per image, besides the original.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the jitter and of a random-init backbone.")] = 0,
    views: Annotated[str, typer.Option(help="Cohen radiographic views to keep, comma-separated.")] = "PA",
    dtype: Annotated[str, typer.Option(help="float16 or float32 storage.")] = "float16",
    batch_size: Annotated[int, typer.Option(help="Forward-pass batch size.")] = 16,
    workers: Annotated[int, typer.Option(help="Decoding threads.")] = 2,
    occlude: Annotated[str, typer.Option(help="none, box (a central lung box) or a folder of lung masks: blanked before extraction.")] = "none",
    full_decode: Annotated[bool, typer.Option(help="Decode large JPEGs at full size (default: libjpeg's scaled decoding to >= 448 px, then the same resize).")] = False,
    max_pixels: Annotated[int, typer.Option(help="Skip images with more pixels (read from the header, before decoding).")] = 64_000_000,
    max_file_mb: Annotated[float, typer.Option(help="Skip larger files, before reading them.")] = 256.0,
    min_side: Annotated[int, typer.Option(help="Skip images whose shorter side is smaller.")] = 64,
    max_aspect: Annotated[float, typer.Option(help="Skip images whose longer side exceeds the shorter this many times.")] = 4.0,
    on_conflict: Annotated[str, typer.Option(help="error (stop, listing them) or skip (drop every copy): the same bytes under two labels.")] = "error",
    rebuild: Annotated[bool, typer.Option(help="Move a damaged or unwanted cache (and its shards) aside and extract again.")] = False,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (an actor pool on an embedded or existing Ray; pip install -e '.[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray).")] = None,
    ray_workers: Annotated[int, typer.Option(help="Ray actors, each holding the backbone once.")] = 2,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs each Ray actor reserves (fractions leave room for Ray's own tasks on small machines).")] = 0.5,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs each Ray actor reserves (1 on a GPU node).")] = 0.0,
    shard: Annotated[Optional[str], typer.Option(help="i/N: compute only slice i of N of the shards (Slurm array or Kubernetes indexed jobs); a run without it merges.")] = None,
    cache_dir: CacheDir = Path("cache"),
):
    """Run one frozen backbone over the radiographs and cache the pre-pool feature maps (HDF5).

    The last line on stdout is the cache's path. Re-running a finished command does no work;
    re-running an interrupted one resumes it. The split is not made here: see fit-head.
    """
    import covfeat.extraction.run as ex

    cfg = _check(_extract_config, backbone=backbone, weights=weights, preprocess=preprocess, augment=augment,
                 seed=seed, views=views, dtype=dtype, batch_size=batch_size, workers=workers, occlude=occlude,
                 full_decode=full_decode, max_pixels=max_pixels, max_file_mb=max_file_mb, min_side=min_side,
                 max_aspect=max_aspect, on_conflict=on_conflict)
    from covfeat.extraction.config import DriverConfig

    drv = _check(lambda: DriverConfig(engine=engine, address=address, ray_workers=ray_workers,
                                      cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                      shard=DriverConfig.parse_shard(shard)))
    path = _guard(ex.extract, data, cfg, cache_dir, progress=_progress(), rebuild=rebuild, driver=drv)
    if path is None:
        typer.echo("shards written; the index follows when every shard is present")
    else:
        typer.echo(str(path))


@app.command("fit-head")
def fit_head(
    cache: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, resolve_path=True, help="Feature cache (.h5).")] = None,
    backbone: Annotated[Optional[str], typer.Option("--backbone", "-b", help="Use the complete cache of this backbone (refused when there are several, unless --data picks one).")] = None,
    data: Data = None,
    cache_dir: CacheDir = Path("cache"),
    runs_dir: RunsDir = Path("runs"),
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="JSON or TOML file of settings (keys as the flags, with _).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="\\[default: 100]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="\\[default: 8]")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="SGD learning rate \\[default: 1e-4]")] = None,
    momentum: Annotated[Optional[float], typer.Option(help="SGD momentum \\[default: 0.5]")] = None,
    dropout: Annotated[Optional[float], typer.Option(help=_dropout_help())] = None,
    dense_units: Annotated[Optional[int], typer.Option(help="\\[default: 128]")] = None,
    activity_l1: Annotated[Optional[float], typer.Option(help="\\[default: 0.001]")] = None,
    activity_l2: Annotated[Optional[float], typer.Option(help="\\[default: 0.001]")] = None,
    balance: Annotated[Optional[str], typer.Option(help="smote | none | class-weight \\[default: smote]")] = None,
    smote_k: Annotated[Optional[int], typer.Option(help="SMOTE neighbours, reduced for a small minority \\[default: 5]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of SMOTE, the head's initialisation, dropout and shuffling \\[default: 0]")] = None,
    engine: Annotated[Optional[str], typer.Option(help="numba (compiled batch steps) | tf (Keras layers in tf.function); same maths \\[default: numba]")] = None,
    val: Annotated[Optional[float], typer.Option(help="Validation share \\[default: 0.1]")] = None,
    test: Annotated[Optional[float], typer.Option(help="Test share \\[default: 0.3]")] = None,
    split_by: Annotated[Optional[str], typer.Option(help="patient (no patient in two splits) or image (the paper's naive split) \\[default: patient]")] = None,
    split_seed: Annotated[Optional[int], typer.Option(help="Seed of the split and the folds \\[default: 0]")] = None,
    near_duplicates: Annotated[Optional[str], typer.Option(help="group (near-duplicate images on one side of every split) or ignore \\[default: group]")] = None,
    target_recall: Annotated[Optional[float], typer.Option(help="Pick the threshold on validation rows to reach this COVID-19 recall.")] = None,
    folds: Annotated[Optional[int], typer.Option(help="Cross-validation folds (0: one split) \\[default: 0]")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Cross-validation repeats \\[default: 1]")] = None,
    memory_budget: Annotated[Optional[float], typer.Option(help="GiB of training maps held in memory; above it they are streamed from HDF5 \\[default: 8]")] = None,
):
    """Train the paper's head on cached features (split, SMOTE in feature space, fresh views each epoch).

    The split is made here, so changing it reuses the cache. The last line on stdout is the run folder.
    """
    import covfeat.head.fit as train
    from covfeat.head.config import fit_config

    fit = _check(fit_config, config, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                 momentum=momentum, dropout=dropout, dense_units=dense_units, activity_l1=activity_l1,
                 activity_l2=activity_l2, balance=balance, smote_k=smote_k, seed=seed, engine=engine, val=val,
                 test=test, split_by=split_by, split_seed=split_seed, near_duplicates=near_duplicates, target_recall=target_recall, folds=folds,
                 repeats=repeats, memory_budget=memory_budget)
    from covfeat.extraction.sources import content_hashes
    from covfeat.store.catalog import choose_cache

    path = _guard(choose_cache, cache, backbone, cache_dir, content_hashes(data) if data else None, tensorflow=False)
    typer.echo(str(_guard(train.fit_head, path, fit, runs_dir, progress=_progress(), tensorflow=False)))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(exists=True, file_okay=False, help="Run folders from fit-head.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for table2.md/.csv/.json and the PNG figures \\[default: the first run folder]")] = None,
):
    """Print the paper's Table 2 for the runs side by side; write Markdown, CSV, JSON and figures."""
    import covfeat.use.report as rp

    typer.echo(_guard(rp.report, runs, out if out is not None else runs[0]))


@app.command()
def predict(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    images: Annotated[list[Path], typer.Argument(exists=True, help="Image files or folders.")],
    out: Annotated[Optional[Path], typer.Option(help="Write the table to FILE.csv or FILE.json.")] = None,
):
    """P(COVID-19) for new radiographs, with the run's own preprocessing, backbone, head and threshold."""
    import covfeat.use.predict as pr

    _check(pr.check_table_path, out)
    rows = _guard(pr.predict, run, images)
    typer.echo(pr.format_table(rows))
    bad = sum(1 for r in rows if r["error"])
    if bad:
        typer.echo(f"{bad} of {len(rows)} image(s) could not be read; see 'skipped' above.", err=True)
    if out is not None:
        typer.echo(str(_guard(pr.write_table, rows, out)))


@app.command()
def export(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    out: Annotated[Path, typer.Option(help="Output .keras file.")],
):
    """One Keras model (preprocessing, backbone, head): 224x224 RGB in [0, 255] -> (p_normal, p_covid)."""
    import covfeat.use.predict as pr

    typer.echo(str(_guard(pr.export, run, out)))


@app.command()
def reproduce(
    data: Data = None,
    weights: Weights = "imagenet",
    augment: Annotated[int, typer.Option(help="Jittered views per image.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of jitter, random init, split and head.")] = 0,
    split_by: Annotated[str, typer.Option(help="patient or image (the paper's naive split).")] = "patient",
    epochs: Annotated[int, typer.Option(help="Head epochs (the paper: 100).")] = 100,
    backbones: Annotated[str, typer.Option(help="Comma-separated, default all registered.")] = "",
    cache_dir: CacheDir = Path("cache"),
    runs_dir: RunsDir = Path("runs"),
):
    """The paper in one command: extract + fit-head + report for the four backbones, and its Table 2
    beside the measured one. Resumes where it stopped (each stage is cached)."""
    import covfeat.use.reproduce as rp
    from covfeat.extraction.backbones import list_backbones
    from covfeat.extraction.config import ExtractConfig
    from covfeat.head.config import FitConfig, HeadConfig, SplitConfig

    names = [b.strip() for b in backbones.split(",") if b.strip()] or list_backbones()
    for name in names:  # every name checked before the first extraction starts
        base = _check(lambda: ExtractConfig(backbone=name, weights=weights, augment=augment, seed=seed))
    fit = _check(lambda: FitConfig(head=HeadConfig(epochs=epochs, seed=seed), split=SplitConfig(by=split_by, seed=seed)))
    runs, _ = _guard(rp.reproduce, data, base, fit, cache_dir, runs_dir, names, progress=_progress())
    out = rp.report_folder(runs_dir, runs)
    typer.echo(_guard(rp.full_report, runs, out))
    typer.echo(str(out))


@app.command()
def audit(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    occlude: Annotated[str, typer.Option(help="box (a central lung box) or a folder of lung masks named like the images.")] = "box",
    external: Annotated[Optional[list[Path]], typer.Option(exists=True, help="Another labelled source to score the run on (repeatable).")] = None,
    keep_overlap: Annotated[bool, typer.Option(help="Keep external images that are near-duplicates of the run's own (default: left out, listed).")] = False,
    cache_dir: CacheDir = Path("cache"),
):
    """Shortcut audit: metadata, control, occlusion and source probes, and (with --external) external validation.

    Verdicts are printed and kept in RUN/audit.json; `covfeat report RUN` shows them.
    """
    import covfeat.probes.audit as au
    from covfeat.extraction.config import OcclusionConfig

    occl = _check(OcclusionConfig.parse, occlude)
    res = _guard(au.audit, run, occlusion=occl, external=external, cache_dir=cache_dir, progress=_progress(),
                 keep_overlap=keep_overlap)
    typer.echo(au.summary(res))
    typer.echo(str(run / "audit.json"))


@app.command()
def explain(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    images: Annotated[list[Path], typer.Argument(exists=True, help="Image files or folders.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the heat-map PNGs [default: RUN/gradcam, where report finds them]")] = None,
):
    """Grad-CAM heat maps (one PNG per image) through the run's preprocessing, backbone and head."""
    import covfeat.use.explain as ex

    out = out if out is not None else run / "gradcam"
    rows = _guard(ex.explain, run, images, out)
    for r in rows:
        typer.echo(f"{r['path']}: skipped: {r['error']}" if r["error"] else f"{r['png']}  p_covid {r['p_covid']:.4f}")
    typer.echo(str(out))


@app.command()
def info(cache: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Feature cache (.h5).")]):
    """A cache's config and counts, and every file that is not in it, with the reason."""
    from covfeat.store.catalog import info as cache_info

    typer.echo(_guard(cache_info, cache))


@app.command()
def verify(cache: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Feature cache (.h5).")]):
    """Check every checksum of a cache (Fletcher-32 on every chunk, a digest of the rest)."""
    from covfeat.store.catalog import verify_cache

    r = _guard(verify_cache, cache)
    typer.echo(f"{r['path']}: verified ({r['images']} images, {r['samples']} feature maps, {r['chunks']} chunks)")


@app.command()
def clean(
    cache_dir: CacheDir = Path("cache"),
    runs_dir: RunsDir = Path("runs"),
):
    """Remove covfeat's leftovers of killed runs: shard folders and temporary files no live process holds.

    Interrupted extractions lose their resumable shards; moved-aside damaged caches are listed, not removed.
    """
    from covfeat.head.runs import remove_stale_tmp
    from covfeat.store.catalog import clean_cache_dir

    removed, kept = _guard(clean_cache_dir, cache_dir)
    removed += remove_stale_tmp(runs_dir) if runs_dir.is_dir() else []
    for p in removed:
        typer.echo(f"removed {p}")
    for p in kept:
        typer.echo(f"kept {p} (moved aside by --rebuild; delete it yourself when you no longer need it)")
    typer.echo(f"{len(removed)} leftover(s) removed")


def main():
    app()


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


if __name__ == "__main__":
    main()
