"""config.yaml, validated with pydantic.

Every setting has a default, so the node and ``cxrtriage score`` run with no
config file at all; config.yaml in the repository lists them with comments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from .inference.models import ModelSpec, read_spec
from .inference.presets import PAPER_ZONE_THRESHOLDS, PRESETS


class ScoringSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    zone_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="T; null = the disease model's own (per-architecture) T"
    )
    brixia_cutoffs: tuple[float, float, float] = (0.05, 0.30, 0.60)


class InferenceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = Field("bundled", description="bundled | danilov2022")
    lungs: dict[str, Any] = Field(default_factory=dict, description="ModelSpec fields overriding the preset")
    disease: dict[str, Any] = Field(default_factory=dict)
    device: str = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")
    batch_size: int = Field(1, ge=1)
    min_lung_blob_fraction: float = Field(0.01, ge=0.0, lt=0.5, description="smaller lung blobs are dropped")
    crop_margin: float = Field(0.02, ge=0.0, lt=0.5, description="margin around the lung box, fraction of image")
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)

    def model_specs(self) -> tuple[ModelSpec, ModelSpec]:
        """The preset's specs with the overrides applied.

        An override whose ``weights`` is a ``.safetensors`` file written by
        ``cxrtriage train`` brings its own spec, so a retrained model only
        needs its path.
        """
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        preset_pair: tuple[ModelSpec, ModelSpec] | None = None
        specs = []
        for index, override in enumerate((self.lungs, self.disease)):
            weights = override.get("weights")
            if weights and str(weights).endswith(".safetensors"):
                base = read_spec(weights)
            else:
                preset_pair = preset_pair or PRESETS[self.preset]()
                base = preset_pair[index]
            specs.append(ModelSpec.model_validate({**base.model_dump(), **override}))
        lungs, disease = specs
        if disease.zone_threshold is None:
            disease = disease.model_copy(update={"zone_threshold": PAPER_ZONE_THRESHOLDS.get(disease.arch, 0.30)})
        return lungs, disease


class Settings(BaseModel):
    model_config = ConfigDict(extra="allow")

    inference: InferenceSettings = Field(default_factory=InferenceSettings)


def load_settings(path: str | Path | None = None) -> Settings:
    """Read config.yaml; ``None`` gives the defaults."""
    if path is None:
        return Settings()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return Settings.model_validate(data)
