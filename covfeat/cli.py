"""The command line: parse options, call the library, turn covfeat errors into one line.

No logic lives only here; each command calls a function of the library.
"""

from __future__ import annotations

import inspect
import operator
import os
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer  # noqa: E402

from covfeat.cli_lungs import lungs_app
from covfeat.clikit import check, guard, progress
from covfeat.core.settings import default_of, flagged, from_dict, help_text, option_name, shown_default
from covfeat.extraction.config import DriverConfig, ExtractConfig, OcclusionConfig
from covfeat.extraction.sources import describe_layouts
from covfeat.head.config import FitConfig, HeadConfig, SplitConfig, file_keys, fit_config
from covfeat.trust.intervals import MARGIN

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer-learning COVID-19 vs NORMAL chest-radiograph classifiers on a cached feature store.")


@app.callback()
def _root():
    """covfeat: extract -> fit-head -> report; audit and explain keep the numbers honest."""


# --------------------------------------------------------------------------- options from the declarations
# A setting's flag, help and default are declared once, on its config field (covfeat.core.settings.setting);
# the options of extract and fit-head are made from those declarations, so a new field is a new flag.  What
# stays here is what only the command line has: options that are no setting (--data, --cache-dir, ...) and
# the conversions between a flag's text and its setting's value.


@dataclass(frozen=True)
class Conversion:
    """A flag whose command-line form is not its setting's value."""

    type: Any  # what typer parses
    values: Callable[[Any], dict]  # the flag's value -> the settings it gives, at its field's level
    default: Callable[[Any], Any] = lambda d: d  # the setting's default -> the flag's


EXTRACT_CONVERSIONS = {
    "views": Conversion(str, lambda text: {"views": tuple(v.strip() for v in text.split(",") if v.strip())}, ",".join),
    "occlude": Conversion(str, lambda text: OcclusionConfig.parse(text).as_dict()),  # none, box or a masks folder
    "full_decode": Conversion(bool, lambda full: {"scaled_decode": not full}, operator.not_),
    "shard": Conversion(str, lambda text: {"shard": DriverConfig.parse_shard(text)}),
}


def _field(cls, name: str):
    return {f.name: f for f in fields(cls)}[name]


def _option(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def declared(cls, conversions: dict | None = None, *, only=None, skip=(), given: bool = False) -> list:
    """The typer options of the flagged settings of ``cls``, in declaration order: each one's
    flag, short form, help and default from its declaration, or from its conversion.

    With ``given``, every option is Optional with no default (None: not given, so a config
    file may set it) and the declared default is written into its help, as "[default: ...]".
    """
    conversions = conversions or {}
    out = []
    for _, owner, f in flagged(cls):
        name = option_name(f)
        if (only is not None and name not in only) or name in skip:
            continue
        conv = conversions.get(name)
        typ = conv.type if conv else _plain_type(owner, f)
        decls = (f.metadata["flag"], f.metadata["short"]) if f.metadata.get("short") else ()
        if given:
            shown = shown_default(f)
            text = " ".join(t for t in (help_text(f), f"\\[default: {shown}]" if shown is not None else "") if t)
            out.append(_option(name, Annotated[Optional[typ], typer.Option(*decls, help=text)], None))
            continue
        default = conv.default(default_of(f)) if conv else default_of(f)
        out.append(_option(name, Annotated[typ if default is not None else Optional[typ],
                                           typer.Option(*decls, help=help_text(f))],
                           inspect.Parameter.empty if default is MISSING else default))
    return out


def _plain_type(owner, f):
    """int, float, str or bool: the field's type without ``| None``; anything else needs a Conversion."""
    hint = typing.get_type_hints(owner)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    typ = args[0] if len(args) == 1 else hint
    if typ not in (int, float, str, bool):
        raise TypeError(f"{owner.__name__}.{f.name}: {f.metadata['flag']} of type {hint} needs a Conversion in "
                        "covfeat/cli.py (typer parses int, float, str and bool).")
    return typ


def options(*params: inspect.Parameter):
    """Give a command ``fn(**opts)`` the signature typer reads its options from (in this order)."""
    names = [p.name for p in params]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"two options named {twice}")

    def give(fn):
        fn.__signature__ = inspect.Signature(list(params))
        return fn

    return give


def settings_from(cls, opts: dict, conversions: dict | None = None):
    """The config ``cls`` from a command's parsed options (those :func:`declared` made)."""
    conversions = conversions or {}
    values: dict = {}
    for path, _, f in flagged(cls):
        where = values
        for name in path:
            where = where.setdefault(name, {})
        name = option_name(f)
        where.update(conversions[name].values(opts[name]) if name in conversions else {f.name: opts[name]})
    return from_dict(cls, values, "flags")


Data = Annotated[Optional[list[Path]], typer.Option("--data", "-d", exists=True, resolve_path=True,
                                                   help=f"Image source (repeatable): {describe_layouts()}. Default: the bundled sample.")]


CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Where feature caches live.")]


Weights = Annotated[str, typer.Option("--weights", help=help_text(_field(ExtractConfig, "weights")))]


RunsDir = Annotated[Path, typer.Option(help="Where run folders are written.")]


DATA = _option("data", Data, None)
CACHE_DIR = _option("cache_dir", CacheDir, Path("cache"))
RUNS_DIR = _option("runs_dir", RunsDir, Path("runs"))


class RebuildFlag(typer.core.TyperCommand):
    """``--rebuild`` alone means ``--rebuild damaged``; ``--rebuild all`` and ``--rebuild damaged``
    take their word (click has no option whose value may be left out)."""

    def parse_args(self, ctx, args):
        out, i = [], 0
        while i < len(args):
            if args[i] == "--rebuild":
                word = args[i + 1] if i + 1 < len(args) and args[i + 1] in ("all", "damaged") else None
                out.append(f"--rebuild={word or 'damaged'}")
                i += 2 if word else 1
                continue
            out.append(args[i])
            i += 1
        return super().parse_args(ctx, out)


@app.command(cls=RebuildFlag)
@options(*declared(ExtractConfig, only=("backbone",)), DATA,
         *declared(ExtractConfig, EXTRACT_CONVERSIONS, skip=("backbone",)),
         _option("rebuild", Annotated[Optional[str], typer.Option(metavar="[all]", help=(
             "Alone: recompute the damaged shards (moved aside, never deleted) and rewrite the index. 'all': move the whole "
             "cache aside and extract again."))], None),
         *declared(DriverConfig, EXTRACT_CONVERSIONS), CACHE_DIR)
def extract(**opts):
    """Run one frozen backbone over the radiographs and cache the pre-pool feature maps (HDF5).

    The last line on stdout is the cache's path. Re-running a finished command does no work;
    re-running an interrupted one resumes it. The split is not made here: see fit-head.
    """
    import covfeat.extraction.run as ex
    import covfeat.extraction.work

    cfg = check(settings_from, ExtractConfig, opts, EXTRACT_CONVERSIONS)
    drv = check(settings_from, DriverConfig, opts, EXTRACT_CONVERSIONS)
    covfeat.extraction.work.OWN_PROCESS = True  # this process only extracts: one thread per operation and stream
    try:
        path = guard(ex.extract, opts["data"], cfg, opts["cache_dir"], progress=progress(), rebuild=opts["rebuild"],
                      driver=drv, tensorflow=False)  # the model build imports it, quietly; a complete cache never does
    finally:
        covfeat.extraction.work.OWN_PROCESS = False  # (the command run in a caller's process, as tests do)
    if path is None:
        typer.echo("shards written; the index follows when every shard is present")
    else:
        typer.echo(str(path))


@app.command("fit-head")
@options(_option("cache", Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, resolve_path=True,
                                                                 help="Feature cache (.h5).")], None),
         _option("backbone", Annotated[Optional[str], typer.Option("--backbone", "-b", help=(
             "Use the complete cache of this backbone (refused when there are several, unless --data picks one)."))],
                 None),
         DATA, CACHE_DIR, RUNS_DIR,
         _option("config", Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help=(
             "JSON or TOML file of settings (keys as the flags, with _)."))], None),
         *declared(FitConfig, given=True))
def fit_head(**opts):
    """Train the paper's head on cached features (split, SMOTE in feature space, fresh views each epoch).

    The split is made here, so changing it reuses the cache. The last line on stdout is the run folder.
    """
    import covfeat.head.fit as train

    fit = check(fit_config, opts["config"], **{k: opts[k] for k in file_keys()})
    from covfeat.extraction.sources import content_hashes
    from covfeat.store.catalog import choose_cache

    data = opts["data"]
    path = guard(choose_cache, opts["cache"], opts["backbone"], opts["cache_dir"],
                  content_hashes(data) if data else None, tensorflow=False)
    typer.echo(str(guard(train.fit_head, path, fit, opts["runs_dir"], progress=progress(), tensorflow=False)))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(exists=True, file_okay=False, help="Run folders from fit-head.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for table2.md/.csv/.json and the PNG figures \\[default: the first run folder]")] = None,
    prevalence: Annotated[Optional[float], typer.Option(help="COVID-19 share for PPV and NPV (a deployment's) \\[default: each run's test share]")] = None,
):
    """Print the paper's Table 2 for the runs side by side; write Markdown, CSV, JSON and figures."""
    import covfeat.use.report as rp

    typer.echo(guard(rp.report, runs, out if out is not None else runs[0], prevalence=prevalence))


Prevalence = Annotated[Optional[float], typer.Option(help=(
    "COVID-19 share of the population the model is used on: p_covid is corrected from the head's training prior "
    "to it \\[default: the share of the run's images]"))]


@app.command()
def predict(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    images: Annotated[list[Path], typer.Argument(exists=True, help="Image files or folders.")],
    out: Annotated[Optional[Path], typer.Option(help="Write the table to FILE.csv or FILE.json.")] = None,
    prevalence: Prevalence = None,
):
    """P(COVID-19) for new radiographs, with the run's own preprocessing, backbone, head and threshold.

    p_covid is corrected from the prior the head was trained toward (SMOTE: 50/50) to the prevalence;
    p_covid_raw is the head's own, and the label is the run's threshold on it.
    """
    import covfeat.use.predict as pr

    check(pr.check_table_path, out)
    check(pr.check_prevalence, prevalence)
    rows, corr = guard(pr.predict_table, run, images, prevalence=prevalence)
    typer.echo(pr.format_table(rows, corr))
    bad = sum(1 for r in rows if r["error"])
    if bad:
        typer.echo(f"{bad} of {len(rows)} image(s) could not be read; see 'skipped' above.", err=True)
    if out is not None:
        typer.echo(str(guard(pr.write_table, rows, out)))


@app.command()
def export(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    out: Annotated[Path, typer.Option(help="A .keras file (keras), a new or empty folder (savedmodel) or a .onnx file "
                                           "(onnx); serving.json and model_card.md/.json are written beside it "
                                           "(serving.json inside the SavedModel folder).")],
    format: Annotated[str, typer.Option(help="keras (needs covfeat to load), savedmodel (TF Serving; signatures "
                                             "pixels and image_bytes) or onnx (ONNX Runtime; input pixels only: "
                                             "onnxruntime has no image decoder, so the client decodes as "
                                             "serving.json says; needs pip install 'covfeat\\[onnx]').")] = "keras",
    prevalence: Prevalence = None,
):
    """The run as one model: its scaling, backbone, head, prior correction and threshold.

    pixels: 224x224 RGB in [0, 255] (float32), decoded as `covfeat predict` decodes. savedmodel and
    onnx load without covfeat and give p_covid (corrected from the head's training prior to the
    prevalence), p_covid_raw, covid (1 at the run's threshold on p_covid_raw) and threshold;
    keras gives probabilities and covid. serving.json states the input contract and the outputs.
    """
    import covfeat.use.export as ex

    check(ex.check_out, out, format)
    if format == "onnx":
        from covfeat.use.export_onnx import require_onnx

        check(require_onnx)
    check(ex.check_prevalence, prevalence)
    typer.echo(str(guard(ex.export, run, out, prevalence, format)))


@app.command()
def reproduce(
    data: Data = None,
    weights: Weights = _field(ExtractConfig, "weights").default,
    augment: Annotated[int, typer.Option(help="Jittered views per image.")] = _field(ExtractConfig, "augment").default,
    seed: Annotated[int, typer.Option(help="Seed of jitter, random init, split and head.")] = 0,
    split_by: Annotated[str, typer.Option(help="patient or image (the paper's naive split).")] = _field(
        SplitConfig, "by").default,
    epochs: Annotated[int, typer.Option(help="Head epochs (the paper: 100).")] = _field(HeadConfig, "epochs").default,
    backbones: Annotated[str, typer.Option(help="Comma-separated, default all registered.")] = "",
    folds: Annotated[int, typer.Option(help=(
        "Cross-validate each backbone with this many folds and rank them by the mean (0: one split, ranked by "
        "validation)."))] = 0,
    cache_dir: CacheDir = Path("cache"),
    runs_dir: RunsDir = Path("runs"),
):
    """The paper in one command: extract + fit-head + report for the four backbones, and its Table 2
    beside the measured one. Resumes where it stopped (each stage is cached).

    Backbones are ranked by validation (or --folds), never by test; the chosen one's test numbers
    follow, and backbone vs backbone as paired differences on the same test rows (Holm-adjusted).
    """
    import covfeat.use.reproduce as rp
    from covfeat.extraction.backbones import list_backbones

    names = [b.strip() for b in backbones.split(",") if b.strip()] or list_backbones()
    for name in names:  # every name checked before the first extraction starts
        base = check(lambda: ExtractConfig(backbone=name, weights=weights, augment=augment, seed=seed))
    fit = check(lambda: FitConfig(head=HeadConfig(epochs=epochs, seed=seed), split=SplitConfig(by=split_by, seed=seed),
                                   folds=folds))
    runs, _ = guard(rp.reproduce, data, base, fit, cache_dir, runs_dir, names, progress=progress())
    out = rp.report_folder(runs_dir, runs)
    typer.echo(guard(rp.full_report, runs, out))
    typer.echo(str(out))


class _ProbesHelp(typer.core.TyperCommand):
    """A command whose help names the registered probes, read when the help is shown: listing
    them imports the probes (about 0.4 s), which no other command should pay for."""

    @property
    def help(self):
        text = self.__dict__.get("_help")
        if text and "{probes}" in text:
            from covfeat.probes.probe import describe_probes

            text = text.replace("{probes}", describe_probes())
        return text

    @help.setter
    def help(self, value):
        self.__dict__["_help"] = value


@app.command(cls=_ProbesHelp)
def audit(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    occlude: Annotated[str, typer.Option(help="box (a central box, not the lung field), a folder of lung masks named like the images, or a lungs model folder (its lung fields blanked).")] = "box",
    lungs: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False, resolve_path=True, help="A lungs model folder (covfeat lungs fit): two more occlusion probes, its lung fields blanked and only the lungs kept, and the share of the lungs every occlusion covered.")] = None,
    external: Annotated[Optional[list[Path]], typer.Option(exists=True, help="Another labelled source to score the run on (repeatable).")] = None,
    keep_overlap: Annotated[bool, typer.Option(help="Keep external images that are near-duplicates of the run's own (default: left out, listed).")] = False,
    margin: Annotated[float, typer.Option(help="AUC difference the verdicts treat as negligible: FLAGGED beyond it, CLEAR within it, else INCONCLUSIVE.")] = MARGIN,
    cache_dir: CacheDir = Path("cache"),
):
    """Shortcut audit: {probes}.

    Verdicts are printed and kept in RUN/audit.json; `covfeat report RUN` shows them.
    """
    import covfeat.probes.audit as au

    occl = check(OcclusionConfig.parse, occlude)
    res = guard(au.audit, run, occlusion=occl, external=external, cache_dir=cache_dir, progress=progress(),
                 keep_overlap=keep_overlap, margin=margin, lungs=lungs)
    typer.echo(au.summary(res))
    typer.echo(str(run / "audit.json"))


@app.command()
def explain(
    run: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Run folder from fit-head.")],
    images: Annotated[list[Path], typer.Argument(exists=True, help="Image files or folders.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the heat-map PNGs [default: RUN/gradcam, where report finds them]")] = None,
    lungs: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False, help="A lungs model (covfeat lungs fit): "
                                                  "measure each heat map's share inside the lungs, draw their contour")] = None,
):
    """Grad-CAM heat maps (one PNG per image) through the run's preprocessing, backbone and head."""
    import covfeat.use.explain as ex

    out = out if out is not None else run / "gradcam"
    rows = guard(ex.explain, run, images, out, lungs)
    for r in rows:
        typer.echo(ex.row_text(r))
    if lungs is not None:
        typer.echo(f"In-lung shares ({ex.MEASURED_AT}): {out / ex.SHARE_TABLE}")
    typer.echo(str(out))


@app.command()
def info(cache: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Feature cache (.h5).")]):
    """A cache's config and counts, and every file that is not in it, with the reason."""
    from covfeat.store.catalog import info as cache_info

    typer.echo(guard(cache_info, cache, tensorflow=False))


@app.command()
def verify(cache: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Feature cache (.h5).")]):
    """Check every checksum of a cache (Fletcher-32 on every chunk, a digest of the rest)."""
    from covfeat.store.catalog import verify_cache

    r = guard(verify_cache, cache, tensorflow=False)
    typer.echo(f"{r['path']}: verified ({r['images']} images, {r['samples']} feature maps, {r['chunks']} chunks)")


@app.command()
def clean(
    cache_dir: CacheDir = Path("cache"),
    runs_dir: RunsDir = Path("runs"),
):
    """Remove covfeat's leftovers of killed runs: temporary files whose writer is gone, unheld claims and locks.

    Finished shards are never removed, even before their index exists; moved-aside caches and files covfeat cannot
    prove its own are listed, not removed.
    """
    from covfeat.head.runs import remove_stale_tmp
    from covfeat.store.catalog import clean_cache_dir

    report = guard(clean_cache_dir, cache_dir, tensorflow=False)
    report.removed += remove_stale_tmp(runs_dir) if runs_dir.is_dir() else []
    typer.echo(report.text())


app.add_typer(lungs_app, name="lungs")


def main():
    app()


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


if __name__ == "__main__":
    main()
