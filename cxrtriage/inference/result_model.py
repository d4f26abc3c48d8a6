"""The typed record of one scored radiograph: what is stored, read back and served.

:class:`ImageResult` is the one shape of an image's result everywhere outside
the pipeline: ``results.json`` of ``cxrtriage score``, the ``details`` column
of the database, the worklist, and the REST API (so the OpenAPI schema names
every field). No torch: the worklist and the web server read results without
loading a model.

Records written before a field existed read back with its default: two lungs,
six scored zones, and no model identity, which counts as research use (the
only models before identities were recorded were the synthetic-only bundle).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .scoring import DEFAULT_ZONE_THRESHOLD, ZONE_NAMES


def unscored_zones(zones_scored: int | None) -> int:
    """Zones of a lung that was not found; ``None`` (records from before the field) means all six scored."""
    return 0 if zones_scored is None else len(ZONE_NAMES) - zones_scored


class _Record(BaseModel):
    # Unknown keys of newer writers are kept, not refused: a record is read back as written.
    model_config = ConfigDict(extra="allow")


class ZoneResult(_Record):
    brixia_zone: str = Field(description="Brixia letter A-F")
    scored: bool = Field(True, description="false: the zone's lung was not found; its scores are null, not 0")
    affected_fraction: float | None = None
    binary_score: int | None = Field(None, description="1 when the affected fraction exceeds T")
    brixia_grade: int | None = Field(None, description="0-3 by the Brixia-style cut-offs")
    area_px: int = 0


class GeographicExtent(_Record):
    right: int = 0
    left: int = 0
    total: int = 0


class StageModelRecord(_Record):
    name: str
    version: str
    origin: str = Field(description="bundled | published | user")
    training_data: list[str] = Field(default_factory=list, description="synthetic, ct-derived, real")
    stage: str = ""


class ModelIdentityRecord(_Record):
    research_use: bool
    notice: str = ""
    lungs: StageModelRecord
    disease: StageModelRecord


class ImageResult(_Record):
    """Every score of one radiograph, and which models produced it."""

    source: str = ""
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    rows: int = 0
    columns: int = 0
    p_disease: float = 0.0
    disease_gate: float = Field(0.5, description="opacity counted only where P(disease) >= this")
    total_score: int = Field(0, description="0-6 over the scored zones")
    zones_scored: int = Field(6, description="6, or 3 when one lung was found")
    missing_lungs: list[str] = Field(default_factory=list, description='"right" / "left": lung not found')
    brixia_total: int = 0
    geographic_extent: GeographicExtent = Field(default_factory=GeographicExtent)
    zone_threshold: float = DEFAULT_ZONE_THRESHOLD
    lungs_found: int = 2
    lung_area_px: int = 0
    lesion_area_px: int = 0
    lung_area_mm2: float | None = None
    lesion_area_mm2: float | None = None
    zones: dict[str, ZoneResult] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=dict, description="stage -> model version")
    model_identity: ModelIdentityRecord | None = None
    research_use: bool = Field(True, description="false only when both models were trained on real radiographs")
    algorithm_version: str = ""
    timings_ms: dict[str, float] = Field(default_factory=dict)

    @property
    def unscored_zones(self) -> int:
        return unscored_zones(self.zones_scored)

    def zone_values(self, key: str) -> list[int | None]:
        """One zone field (``binary_score``, ``brixia_grade``) in A-F order; None where unscored."""
        return [getattr(self.zones[name], key) if name in self.zones else None for name in ZONE_NAMES]
