"""Which models produced a result, and whether it is for research use only.

Clinicians must always see which model produced a score, and that it is for
research use when the models never saw a real radiograph. :class:`ModelIdentity`
is that fact in one place: the pipeline attaches it to every result, the SEG
and SR carry it (TID 4019 Algorithm Identification), the overlay PNG burns it
in, and the worklist and study page show it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch for the worklist, which reads identities back from the database
    from .models import ModelSpec

RESEARCH_USE_NOTICE = "Research use: models not trained on real radiographs"


@dataclass(frozen=True)
class StageModel:
    """One stage's model as a person should see it."""

    stage: str  # lungs | disease
    name: str
    version: str
    origin: str  # bundled | published | user
    training_data: tuple[str, ...]

    @property
    def trained_on_real_radiographs(self) -> bool:
        return "real" in self.training_data

    @property
    def training_label(self) -> str:
        """e.g. "synthetic + ct-derived", or "not stated"."""
        return " + ".join(self.training_data) if self.training_data else "not stated"

    def describe(self) -> str:
        return f"{self.stage}: {self.name} [{self.version}; {self.origin}; trained on {self.training_label}]"

    @classmethod
    def from_spec(cls, stage: str, spec: ModelSpec) -> StageModel:
        return cls(stage, spec.display_name, spec.version, spec.origin, tuple(spec.training_data))


@dataclass(frozen=True)
class ModelIdentity:
    """Both stages' models of a result."""

    lungs: StageModel
    disease: StageModel

    @property
    def research_use(self) -> bool:
        """True unless both models were trained on real radiographs."""
        return not (self.lungs.trained_on_real_radiographs and self.disease.trained_on_real_radiographs)

    @property
    def short_label(self) -> str:
        """A label that fits a DICOM LO (64 characters): who made the models, and the notice."""
        origins = {self.lungs.origin, self.disease.origin}
        who = origins.pop() if len(origins) == 1 else "mixed"
        label = {"bundled": "bundled models", "published": "published models", "user": "site models"}.get(who, "models")
        return f"{label}, RESEARCH USE" if self.research_use else label

    def lines(self) -> list[str]:
        """What a person reads: each model, then the notice when it applies."""
        out = [self.lungs.describe(), self.disease.describe()]
        if self.research_use:
            out.append(RESEARCH_USE_NOTICE)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "research_use": self.research_use,
            "notice": RESEARCH_USE_NOTICE if self.research_use else "",
            "lungs": {**asdict(self.lungs), "training_data": list(self.lungs.training_data)},
            "disease": {**asdict(self.disease), "training_data": list(self.disease.training_data)},
        }

    @classmethod
    def from_specs(cls, lungs: ModelSpec, disease: ModelSpec) -> ModelIdentity:
        return cls(StageModel.from_spec("lungs", lungs), StageModel.from_spec("disease", disease))
