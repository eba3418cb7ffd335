"""Stage one's settings: what decides the cached feature maps, and who computes them.

* :class:`ExtractConfig` -- what changes the cached features (every field enters the
  cache key except those named, with the reason, in :data:`NOT_IN_KEY`);
* :class:`JitterConfig`, :class:`OcclusionConfig`, :class:`LungsConfig` -- its nested parts;
* :class:`DriverConfig` -- local, Ray or a slice of the shards; never changes a number.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from covfeat.core.errors import ConfigError
from covfeat.core.settings import (
    BOOL,
    STRINGS,
    TEXT,
    Checked,
    Rule,
    fail,
    from_dict,
    integer,
    is_int,
    is_number,
    number,
    one_of,
    optional,
    plain,
    setting,
)
from covfeat.extraction.precision import PRECISIONS, check_cpu, route_of

# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class JitterConfig(Checked):
    """Ranges of the random jitter (the meaning ImageDataGenerator gives each range)."""

    rotation: float = setting(15.0, number(0, 180))  # degrees, uniform in [-r, r]
    shift: float = setting(0.1, number(0, 0.5))  # fraction of the side, uniform in [-s, s]
    zoom: float = setting(0.1, number(0, 1, hi_open=True))  # scale uniform in [1-z, 1+z]


def _box_ok(b) -> bool:
    return (isinstance(b, (tuple, list)) and len(b) == 4 and all(is_number(x) and 0 <= x <= 1 for x in b)
            and b[0] < b[2] and b[1] < b[3])


LUNG_KINDS = ("lungs", "outside")  # occlusions made from a lungs model's predicted masks


def is_lungs_folder(path: str | Path) -> bool:
    """A folder that holds a lungs model (``covfeat lungs fit``'s ``lungs.json``), as opposed to
    a folder of mask files: --occlude takes either."""
    from covfeat.lungs.model import INFO

    return Path(path).is_dir() and (Path(path) / INFO).is_file()


@dataclass(frozen=True)
class OcclusionConfig(Checked):
    """What an occlusion probe blanks before extraction: nothing, a central box, lung masks
    from files, or the lung fields a lungs model predicts (``lungs``: the lung fields blanked;
    ``outside``: everything but them)."""

    kind: str = setting("none", one_of("none", "box", "masks", *LUNG_KINDS), flag="--occlude",
                        help="none, box (a central lung box), a folder of lung masks or a lungs model folder: blanked "
                        "before extraction.")
    box: tuple[float, float, float, float] = setting(
        (0.15, 0.1, 0.85, 0.9), Rule("four fractions x0 < x1, y0 < y1 in [0, 1]", _box_ok))
    masks: str = setting("", Rule("a string", lambda v: isinstance(v, str)))  # folder of masks named like the images
    fill: float = setting(127.5, number(0, 255))  # constant on the [0, 255] scale (box and masks)
    # The lungs folder of kinds lungs and outside.  In the cache key by the model's hash, not its
    # folder, and only for those kinds: every other occlusion keeps the key it had (key_config).
    model: str = setting("", Rule("a string", lambda v: isinstance(v, str)))

    def _check(self):
        if self.kind == "masks" and not Path(self.masks).is_dir():
            raise fail("--occlude", "a folder of lung masks", self.masks)
        if (self.kind in LUNG_KINDS) != bool(self.model):
            raise fail("--occlude", f"a lungs model folder exactly with kinds {' and '.join(LUNG_KINDS)}",
                       f"kind {self.kind} with model {self.model!r}")

    def masks_identity(self) -> str:
        """SHA-256 of the mask folder's content: every file's name and bytes, in name order.
        What enters the cache key in place of the folder, so editing a mask changes the key and
        moving the folder does not."""
        import hashlib

        d = hashlib.sha256()
        for f in sorted(Path(self.masks).iterdir()):
            if f.is_file():
                d.update(f.name.encode() + b"\x00" + hashlib.sha256(f.read_bytes()).digest())
        return d.hexdigest()

    @classmethod
    def parse(cls, text: str) -> "OcclusionConfig":
        """The --occlude flag: none, box, a lungs model folder (its lung fields blanked), or a
        folder of masks."""
        if text in ("none", "box"):
            return cls(kind=text)
        if is_lungs_folder(text):
            return cls(kind="lungs", model=str(Path(text).resolve()))
        return cls(kind="masks", masks=str(text))


@dataclass(frozen=True)
class LungsConfig(Checked):
    """The input restricted to the lung fields a lungs model predicts (``covfeat lungs fit``):
    the remedy to try when the audit flags a shortcut outside the lungs."""

    model: str | None = setting(None, optional(TEXT, "the whole image"), flag="--lungs",
                                help="A lungs model folder (covfeat lungs fit): each image restricted to the lung fields "
                                "it finds, as --outside says.")
    outside: str = setting("keep", one_of("keep", "blank", "crop"), flag="--outside",
                           help="keep (the whole image), or with --lungs: blank (the rest filled with the lungs' mean) "
                           "or crop (their box + 5% margin).")

    def _check(self):
        if self.model is None and self.outside != "keep":
            raise ConfigError(f"--outside {self.outside}: needs --lungs MODEL, the lungs folder that finds the lung "
                              "fields (covfeat lungs fit).")
        if self.model is not None and self.outside == "keep":
            raise ConfigError(f"--lungs {self.model}: --outside keep leaves every pixel as it is: give --outside "
                              "blank or crop.")


def _backbone_names() -> list[str]:
    from covfeat.extraction.backbones import list_backbones

    return list_backbones()


def _backbone_rule() -> Rule:
    names = _backbone_names()
    return Rule("a registered backbone, one of " + ", ".join(names), lambda v: isinstance(v, str) and v in names)


@dataclass(frozen=True)
class ExtractConfig(Checked):
    """Stage one: everything that decides the cached feature maps (see NOT_IN_KEY).

    The order of the fields is the order of ``covfeat extract --help``."""

    backbone: str = setting(MISSING, None, flag="--backbone", short="-b",
                            help=lambda: " | ".join(_backbone_names()))  # rule: the registry, at validation time
    weights: str = setting("imagenet", TEXT, flag="--weights",
                           help="imagenet (Keras download/cache), none (random init, NOT PRETRAINED) or a weights FILE.")
    preprocess: str = setting("paper", one_of("paper", "backbone"), flag="--preprocess",
                              help="paper ([0,1] after BGR->RGB) or backbone (its own preprocess_input).")
    augment: int = setting(4, integer(0, 100), flag="--augment",
                           help="Augmented (jittered) views stored per image, besides the original.")
    seed: int = setting(0, integer(0), flag="--seed", help="Seed of the jitter and of a random-init backbone.")
    views: tuple[str, ...] = setting(("PA",), STRINGS, flag="--views",
                                     help="Cohen radiographic views to keep, comma-separated.")
    dtype: str = setting("float16", one_of("float16", "float32"), flag="--dtype", help="float16 or float32 storage.")
    # float32 keeps the key caches had before bfloat16 existed (key_config); bfloat16 enters it with its route.
    precision: str = setting("float32", one_of(*PRECISIONS), flag="--precision",
                             help="float32 (the paper's) or bfloat16 (the forward pass, where the CPU has it natively).")
    batch_size: int = setting(16, integer(1, 4096), flag="--batch-size", help="Forward-pass batch size.")
    workers: int = setting(2, integer(1, 64), flag="--workers", help="Decoding threads.")
    jitter: JitterConfig = setting(factory=JitterConfig, nested=True)
    occlusion: OcclusionConfig = setting(factory=OcclusionConfig, nested=True)
    lungs: LungsConfig = setting(factory=LungsConfig, nested=True)
    scaled_decode: bool = setting(True, BOOL, flag="--full-decode",  # the flag says the opposite: the CLI inverts it
                                  help="Decode large JPEGs at full size (default: libjpeg's scaled decoding to >= 448 "
                                  "px, then the same resize).")
    max_pixels: int = setting(64_000_000, integer(0), flag="--max-pixels",
                              help="Skip images with more pixels, or whose size cannot be measured before "
                              "decoding; 0: no limit.")
    max_file_mb: float = setting(256.0, number(0, lo_open=True), flag="--max-file-mb",
                                 help="Skip larger files, before reading them.")
    min_side: int = setting(64, integer(1), flag="--min-side", help="Skip images whose shorter side is smaller.")
    max_aspect: float = setting(4.0, number(1), flag="--max-aspect",  # longer side / shorter side
                                help="Skip images whose longer side exceeds the shorter this many times.")
    on_conflict: str = setting("error", one_of("error", "skip"), flag="--on-conflict",
                               help="error (stop, listing them) or skip (drop every copy): the same bytes under two "
                               "labels.")

    def _rule(self, f):
        return _backbone_rule() if f.name == "backbone" else f.metadata.get("rule")

    def _check(self):
        if (not isinstance(self.jitter, JitterConfig) or not isinstance(self.occlusion, OcclusionConfig)
                or not isinstance(self.lungs, LungsConfig)):
            raise ConfigError("jitter, occlusion and lungs must be JitterConfig, OcclusionConfig and LungsConfig.")
        check_cpu(self.precision)

    @classmethod
    def from_stored(cls, stored: dict, weights: str | None = None, purpose: str = "use the run") -> "ExtractConfig":
        """The config recorded in a cache (its key fields), with ``weights`` as the argument
        that reproduces its weights (the stored identity is a hash, not a path), and the lungs
        models it used at their recorded folders, each checked to be the very model (see
        :func:`stored_lungs_folder`; ``purpose`` is what the refusal says it was needed for).

        Raises
        ------
        ConfigError
        """
        names = {f.name for f in fields(cls)} - set(NOT_IN_KEY)
        values = {k: stored[k] for k in names if k in stored}
        values["weights"] = weights if weights is not None else stored["weights"]["kind"]
        occ = values.get("occlusion")
        if isinstance(occ, dict) and isinstance(occ.get("model"), dict):
            values["occlusion"] = {**occ, "model": stored_lungs_folder(occ["model"], purpose)}
        if isinstance(occ, dict) and isinstance(occ.get("masks"), dict):
            values["occlusion"] = {**values["occlusion"], "masks": stored_masks_folder(occ["masks"], purpose)}
        if stored.get("lungs"):
            values["lungs"] = {"model": stored_lungs_folder(stored["lungs"]["model"], purpose),
                               "outside": stored["lungs"]["outside"]}
        return from_dict(cls, values, "the cache's config")


# Fields of ExtractConfig that do NOT enter the cache key, each with its reason.  Every
# other field does, defaults included; tests/test_config.py derives the fields from the
# dataclass, so a new field enters the key unless it is added here with a reason.
NOT_IN_KEY = {
    "weights": "replaced by the resolved weights identity (a file's hash, never its path)",
    "batch_size": "the forward pass's batch size does not change the features",
    "workers": "the number of decoding threads does not change the features",
    "on_conflict": "decides which files enter the manifest, whose content and labels are in the key already",
    "lungs": "replaced by the lungs model's hash (never its folder) and --outside, when a model is given; without "
             "one nothing is restricted, and a cache keeps the key it had before lungs existed",
}


def lungs_folders(cfg: ExtractConfig) -> list[str]:
    """The lungs model folders ``cfg`` uses (--lungs, and an --occlude of the lung kinds)."""
    return [m for m in (cfg.lungs.model, cfg.occlusion.model) if m]


def key_config(cfg: ExtractConfig, weights_identity: str, lungs_hashes: dict[str, str] | None = None) -> dict:
    """The part of an extraction config that the cache key is a hash of.

    A lungs model enters by its hash (``lungs_hashes``: folder -> :attr:`LungsModel.hash`, as
    the plan resolved it), and a folder of occlusion masks by the hash of its files, never by its
    folder: moving the folder keeps the key, retraining the
    model changes it.  Entries that only lungs bring are absent without them, so a cache made
    without lungs keeps the key it had before covfeat had lungs.

    Raises
    ------
    ValueError
        A lungs folder of ``cfg`` has no hash in ``lungs_hashes`` (a caller that did not resolve it).
    """
    hashes = lungs_hashes or {}

    def identity(folder: str) -> dict:
        if folder not in hashes:
            raise ValueError(f"key_config: the lungs model {folder} was not resolved to its hash")
        return {"identity": hashes[folder]}

    out = {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in NOT_IN_KEY}
    out["weights"] = {"identity": weights_identity}
    occ = out["occlusion"]
    model = occ.pop("model")
    if model:
        occ["model"] = identity(model)
    if cfg.occlusion.kind == "masks":  # by content, never by folder (without masks the key is unchanged)
        occ["masks"] = {"identity": cfg.occlusion.masks_identity()}
    if cfg.lungs.model:
        out["lungs"] = {"model": identity(cfg.lungs.model), "outside": cfg.lungs.outside}
    if cfg.precision == "float32":
        del out["precision"]
    else:
        out["precision_route"] = route_of(cfg.backbone, cfg.precision)
    return out


def stored_lungs_folder(entry: dict, purpose: str) -> str:
    """The folder of a lungs model a cache recorded (``{"identity", "folder"}``), once it is
    checked to hold that very model: other masks would give other pixels under the same run.

    Raises
    ------
    ConfigError
        The folder is gone, is no lungs folder any more, or holds another model (its hash differs).
    """
    from covfeat.lungs.model import LungsModel

    folder = entry.get("folder")
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"The run's lungs model folder {folder!r} is gone; put it back to {purpose} (its images "
                          "were restricted to the lung fields that model finds).")
    if LungsModel.load(folder).hash != entry["identity"]:
        raise ConfigError(f"The lungs model in {folder} is not the run's (its hash differs: retrained or replaced); "
                          f"refusing to {purpose} with other lung masks.")
    return folder


def stored_masks_folder(entry: dict, purpose: str) -> str:
    """The folder of the occlusion masks a cache recorded (``{"identity", "folder"}``), once
    its content is checked to be the very masks the cache was made with.

    Raises
    ------
    ConfigError
        The folder is gone or its masks changed (their SHA-256 differs).
    """
    folder = entry.get("folder")
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"The run's occlusion mask folder {folder!r} is gone; put it back to {purpose}.")
    if OcclusionConfig(kind="masks", masks=folder).masks_identity() != entry["identity"]:
        raise ConfigError(f"The masks in {folder} are not the ones the cache was made with (their SHA-256 differs: "
                          f"edited, added or removed); refusing to {purpose} with other masks.")
    return folder


def _shard_ok(v) -> bool:
    return v is None or (isinstance(v, tuple) and len(v) == 2 and all(is_int(x) for x in v) and 0 <= v[0] < v[1])


@dataclass(frozen=True)
class DriverConfig(Checked):
    """Who computes the shards of an extraction; never changes the numbers (no field is keyed)."""

    engine: str = setting("local", one_of("local", "ray"), flag="--engine",
                          help="local (this process) or ray (an actor pool on an embedded or existing Ray; "
                          "pip install -e '.[ray]').")
    address: str | None = setting(None, optional(TEXT, "an embedded local Ray, or RAY_ADDRESS"), flag="--address",
                                  help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray).")
    ray_workers: int = setting(2, integer(1, 10000), flag="--ray-workers",
                               help="Ray actors, each holding the backbone once.")
    cpus_per_worker: float = setting(0.5, number(0, lo_open=True), flag="--cpus-per-worker",
                                     help="CPUs each Ray actor reserves (fractions leave room for Ray's own tasks on "
                                     "small machines).")
    gpus_per_worker: float = setting(0.0, number(0), flag="--gpus-per-worker",
                                     help="GPUs each Ray actor reserves (1 on a GPU node).")
    max_retries: int = setting(3, integer(0, 100), flag="--max-retries",
                               help="Ray: restarts of a dead actor and retries of a shard before the run stops, "
                               "naming the shard (Ray's own default: no end).")
    shard: tuple[int, int] | None = setting(None, Rule("i/N with 0 <= i < N", _shard_ok), flag="--shard",
                                            help="i/N: compute only slice i of N of the shards (Slurm array or "
                                            "Kubernetes indexed jobs); a run without it merges.")

    def _check(self):
        if self.shard is not None and self.engine == "ray":
            raise fail("--shard", "the local engine (a slice per process, for array jobs)", "with --engine ray")

    @staticmethod
    def parse_shard(text: str | None) -> tuple[int, int] | None:
        if text is None:
            return None
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise fail("--shard", "i/N with 0 <= i < N", text) from None
        return (i, n)


# --------------------------------------------------------------------------- stage two
