"""Ready-made model pairs: the bundled demonstration models and the paper's setup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import InferenceSettings
from .model_cache import ModelNotCached, cached_path, is_cached
from .models import ModelSpec, read_spec
from .registry import PAIRS, PAPER_ZONE_THRESHOLDS, expand
from .scoring import DEFAULT_BRIXIA_CUTOFFS, DEFAULT_ZONE_THRESHOLD, ScoringConfig

__all__ = [
    "PAPER_ZONE_THRESHOLDS", "PRESETS", "brixia_cutoffs", "bundled", "danilov2022", "model_specs", "preset_specs",
    "scoring_config", "zone_threshold",
]

BUNDLED_LUNGS = "lungs.safetensors"
BUNDLED_DISEASE = "disease.safetensors"


def bundled() -> tuple[ModelSpec, ModelSpec]:
    """The small models that ship in the package (never trained on real radiographs)."""
    specs = []
    for file, label in ((BUNDLED_LUNGS, "lungs"), (BUNDLED_DISEASE, "disease")):
        spec = read_spec(file)
        specs.append(spec.model_copy(update={
            "origin": "bundled",
            "name": spec.name or f"cxrtriage bundled {label} ({spec.arch}/{spec.encoder})",
            # files written before training_data was recorded were trained on phantoms only
            "training_data": spec.training_data or ("synthetic",),
        }))
    return specs[0], specs[1]


def danilov2022(need_weights: tuple[bool, bool] = (True, True)) -> tuple[ModelSpec, ModelSpec]:
    """Danilov et al. 2022: DeepLabV3+/efficientnet-b1 @ 512 and MA-Net/regnetx_064 @ 544.

    The weights (30 MB and 416 MB) are not bundled: they come from the model
    cache, filled by ``cxrtriage models pull danilov2022`` (or ``models import``).
    A stage whose ``need_weights`` is False gets ``weights=None`` (its config
    names its own file). Raises :class:`~cxrtriage.inference.model_cache.ModelNotCached`,
    whose message gives both commands, when a needed file is not cached.
    """
    return _registry_pair("danilov2022", need_weights)


def _registry_pair(name: str, need_weights: tuple[bool, bool]) -> tuple[ModelSpec, ModelSpec]:
    entries = expand(name)
    missing = [e for e, need in zip(entries, need_weights) if need and not is_cached(e)]
    if missing:
        raise ModelNotCached(missing, command_name=name)
    lungs, disease = (e.spec(cached_path(e) if need else None) for e, need in zip(entries, need_weights))
    return lungs, disease


PRESETS = {"bundled": bundled, "danilov2022": danilov2022}


def preset_specs(name: str, lungs: Mapping[str, Any], disease: Mapping[str, Any]) -> tuple[ModelSpec, ModelSpec]:
    """A preset's pair for config overrides ``lungs`` / ``disease``.

    Published weights are looked up in the cache only for a stage whose
    override names no ``weights`` of its own: explicit paths win, and work
    with an empty cache.
    """
    if name in PAIRS:
        return _registry_pair(name, (not lungs.get("weights"), not disease.get("weights")))
    return PRESETS[name]()


def model_specs(settings: InferenceSettings) -> tuple[ModelSpec, ModelSpec]:
    """The configured preset's specs with the config's overrides applied.

    An override whose ``weights`` is a ``.safetensors`` file written by
    ``cxrtriage train`` brings its own spec, so a retrained model only needs
    its path. Raises :class:`~cxrtriage.inference.model_cache.ModelNotCached`
    (naming the command to run) when a published preset's file is not cached.
    """
    if settings.preset not in PRESETS:
        raise ValueError(f"unknown preset {settings.preset!r}; choose one of {sorted(PRESETS)}")
    preset_pair: tuple[ModelSpec, ModelSpec] | None = None
    specs = []
    for index, override in enumerate((settings.lungs, settings.disease)):
        weights = override.get("weights")
        if weights and str(weights).endswith(".safetensors"):
            base = read_spec(weights)
        else:
            preset_pair = preset_pair or preset_specs(settings.preset, settings.lungs, settings.disease)
            base = preset_pair[index]
        specs.append(ModelSpec.model_validate({**base.model_dump(), **override}))
    lungs, disease = specs
    if disease.zone_threshold is None:
        disease = disease.model_copy(
            update={"zone_threshold": PAPER_ZONE_THRESHOLDS.get(disease.arch, DEFAULT_ZONE_THRESHOLD)}
        )
    return lungs, disease


def zone_threshold(settings: InferenceSettings, disease: ModelSpec) -> float:
    """T: the configured one, else the disease model's own, else the paper's (scoring.DEFAULT_ZONE_THRESHOLD)."""
    if settings.scoring.zone_threshold is not None:
        return settings.scoring.zone_threshold
    return disease.zone_threshold if disease.zone_threshold is not None else DEFAULT_ZONE_THRESHOLD


def brixia_cutoffs(settings: InferenceSettings) -> tuple[float, float, float]:
    """The Brixia-style cut-offs: the configured ones, else scoring.DEFAULT_BRIXIA_CUTOFFS."""
    configured = settings.scoring.brixia_cutoffs
    return configured if configured is not None else DEFAULT_BRIXIA_CUTOFFS


def scoring_config(settings: InferenceSettings, disease: ModelSpec) -> ScoringConfig:
    """The scoring thresholds the settings and the disease model give."""
    return ScoringConfig(zone_threshold(settings, disease), brixia_cutoffs(settings))
