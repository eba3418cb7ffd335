"""What an extraction will produce, known before any image is decoded or a model built:
weights and lungs models resolved, sources read and hashed, classes checked, the cache and
its shards named.

The plan is also where the extraction's backbone entry, weights and input pipeline (with its
lungs models, whose hashes enter the key) are made, once: every driver and every shard
computation takes them from it, so no two parts of one extraction can resolve them
differently (a weights file replaced mid-run, say).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from covfeat.core.errors import DataError
from covfeat.extraction.backbones import Backbone, WeightsSpec, get_backbone, resolve_weights
from covfeat.extraction.config import ExtractConfig, key_config
from covfeat.extraction.images import InputPipeline
from covfeat.extraction.sources import Manifest, load_sources
from covfeat.imaging.decode import INPUT_SIZE, SCALED_DECODE_MIN_SIDE
from covfeat.store.key import cache_key, cache_name
from covfeat.store.shards import ShardSpec, plan_shards

SAMPLE_DIR = Path(__file__).parents[1] / "data" / "sample"


def sample_sources() -> list[Path]:
    """The bundled sample: a few dozen downscaled radiographs per class (see NOTICE)."""
    return [SAMPLE_DIR / "cohen", SAMPLE_DIR / "kermany" / "NORMAL"]


def log(msg: str) -> None:
    """One line of the extraction's progress, on stderr (stdout holds only the cache's path)."""
    print(msg, file=sys.stderr, flush=True)


def resolve(cfg: ExtractConfig) -> tuple[Backbone, WeightsSpec, InputPipeline]:
    """The registry entry, the resolved weights and the input pipeline of ``cfg`` (its lungs
    models loaded and checked, so a damaged folder is refused before any image is read).

    Called once per extraction, by :func:`plan`, and once by each Ray actor on its own node
    (whose weights file and Keras cache are its own; the actor checks the identity).

    Raises
    ------
    ConfigError, WeightsUnavailable
    """
    backbone = get_backbone(cfg.backbone)
    weights = resolve_weights(backbone, cfg.weights, seed=cfg.seed)
    return backbone, weights, InputPipeline.for_config(cfg, backbone)


def resolved_config(cfg: ExtractConfig, weights: WeightsSpec, lungs_hashes: dict[str, str] | None = None) -> dict:
    """What the cache records of its config: the key fields, the weights, the folder of each
    lungs model beside its hash (to find it again for predict and the audit; the key holds
    only the hash), and fixed facts."""
    out = key_config(cfg, weights.identity, lungs_hashes)
    out["weights"] = {"identity": weights.identity, "kind": weights.kind, "pretrained": weights.pretrained,
                      "label": weights.label}
    if cfg.occlusion.model:
        out["occlusion"]["model"]["folder"] = str(Path(cfg.occlusion.model).resolve())
    if cfg.occlusion.kind == "masks":  # the key holds their content; the folder is where to find them again
        out["occlusion"]["masks"]["folder"] = str(Path(cfg.occlusion.masks).resolve())
    if cfg.lungs.model:
        out["lungs"]["model"]["folder"] = str(Path(cfg.lungs.model).resolve())
    out.update(
        input_size=INPUT_SIZE,
        resize="cv2.INTER_AREA (shrink) / INTER_LINEAR (enlarge)",
        decode=(f"JPEG scaled in the DCT domain to >= {SCALED_DECODE_MIN_SIDE} px when larger"
                if cfg.scaled_decode else "full size"),
        augment_scope="all rows (evaluation uses view 0 only)",
    )
    return out


def _check_classes(manifest: Manifest) -> None:
    counts = manifest.counts()
    empty = [k for k, n in counts.items() if n == 0]
    if empty:
        raise DataError(
            f"No {' or '.join(empty)} images in the given data ({manifest.summary()}); "
            "covfeat needs both COVID-19 and NORMAL images."
        )


@dataclass
class Plan:
    """What an extraction will produce, known before any image is decoded or model built,
    and what it is made with: drivers and shard computations take these, never resolve them."""

    target: Path
    manifest: Manifest
    config: dict  # what the cache records of cfg
    rows: list[dict]
    key: str
    shards: list[ShardSpec]
    cfg: ExtractConfig
    backbone: Backbone  # the registry entry
    weights: WeightsSpec
    pipeline: InputPipeline


def plan(sources: list[str | Path] | None, cfg: ExtractConfig, cache_dir: str | Path = "cache") -> Plan:
    """Resolve weights, read and hash the sources, check both classes, name the cache and its shards.

    Raises
    ------
    WeightsUnavailable, SourceNotFound, DataError, ConfigError
    """
    cfg.validate()
    backbone, weights, pipeline = resolve(cfg)
    if not sources:
        sources = sample_sources()
        log(f"No --data given: using the bundled sample in {SAMPLE_DIR}")
    manifest = load_sources(sources, views=cfg.views, on_conflict=cfg.on_conflict, max_file_mb=cfg.max_file_mb)
    log(f"Data: {manifest.summary()}")
    if cfg.lungs.model:
        log(f"Lungs: every image restricted to the lung fields the model in {cfg.lungs.model} finds "
            f"(--outside {cfg.lungs.outside}); an image where it finds none is skipped")
    for what, items in (("missing", manifest.missing), ("broken link", manifest.broken_links),
                        ("not opened", manifest.not_images), ("conflicting label", manifest.conflicts)):
        for path, reason in items[:3]:
            log(f"  {what}: {path} ({reason})")
        if len(items) > 3:
            log(f"  ... and {len(items) - 3} more ({what}); `covfeat info CACHE` lists every one")
    _check_classes(manifest)
    config = resolved_config(cfg, weights, pipeline.lungs_hashes)
    rows = [{"path": r.path, "label": r.label, "patient_id": r.patient_id, "source": r.source,
             "view": r.view, "sha256": r.sha256} for r in manifest.records]
    key_rows = [{k: v for k, v in r.items() if k != "path"} for r in rows]
    key = cache_key(key_config(cfg, weights.identity, pipeline.lungs_hashes), key_rows)
    target = Path(cache_dir) / cache_name(cfg.backbone, weights.kind, key)
    return Plan(target, manifest, config, rows, key, plan_shards(rows, key), cfg, backbone, weights, pipeline)
