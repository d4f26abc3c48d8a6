"""Held-out evaluation on synthetic radiographs with exact truth.

Seeds start at :data:`~cxrtriage.inference.training.trainer.HELD_OUT_SEED_BASE`,
a range training never draws from (training uses 0.., model selection
HELD_OUT_SEED_BASE + 50 000..).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...config import InferenceSettings
from ..phantom import PhantomGenerator
from ..pipeline import Pipeline
from ..radiograph import Radiograph
from ..scoring import DEFAULT_ZONE_THRESHOLD, ScoringConfig, ZoneScores
from .metrics import dice, roc_auc
from .trainer import HELD_OUT_SEED_BASE


def truth_scoring(pipeline: Pipeline) -> ScoringConfig:
    """The scores' definition the truth is computed with: a zone is affected above the paper's T = 0.30.

    The model's own T (``pipeline.scoring``) is a decision threshold fitted to its masks; the truth must not move
    with it, or two models with different T would be measured against different truths.
    """
    return ScoringConfig(DEFAULT_ZONE_THRESHOLD, pipeline.scoring.brixia_cutoffs)


def candidate_settings(settings: InferenceSettings, lungs: str | None = None, disease: str | None = None,
                       zone_threshold: float | None = None, disease_gate: float | None = None) -> InferenceSettings:
    """``settings`` with a candidate's weights, T or P(disease) gate, to score it before it is bundled; every other
    configured field is kept."""
    if not lungs and not disease and zone_threshold is None and disease_gate is None:
        return settings
    update: dict[str, dict[str, object]] = {"lungs": dict(settings.lungs), "disease": dict(settings.disease)}
    if lungs:
        update["lungs"]["weights"] = lungs
    if disease:
        update["disease"]["weights"] = disease
    if disease_gate is not None:
        update["disease"]["disease_gate"] = disease_gate
    if zone_threshold is not None:
        update["scoring"] = {**settings.scoring.model_dump(), "zone_threshold": zone_threshold}
    return InferenceSettings(**{**settings.model_dump(exclude_unset=True), **update})


def zone_fractions(scores: ZoneScores) -> list[float | None]:
    """Each zone's opacity fraction; None where the zone's lung was not found (unscored at any T). With these, the
    0-6 scores at any other T follow from one scoring pass (``bench/eval_drr.py --zone-thresholds``)."""
    return [round(f, 5) if ok else None for f, ok in zip(scores.fractions, scores.scored)]


@dataclass
class Evaluation:
    images: int
    lung_dice: float
    lung_dice_min: float
    score_mae: float
    score_exact: float
    zone_accuracy: float
    brixia_mae: float
    auc: float
    disease_dice: float
    seconds_per_image: float
    per_image: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k != "per_image"}


def evaluate_synthetic(pipeline: Pipeline, images: int = 200, first_seed: int = HELD_OUT_SEED_BASE) -> Evaluation:
    """Score ``images`` held-out phantoms and compare with their truth."""
    generator = PhantomGenerator(height=None, width=None)
    rows: list[dict[str, Any]] = []
    probs, labels = [], []
    disease_dices = []
    elapsed = 0.0
    for seed in range(first_seed, first_seed + images):
        phantom = generator(seed)
        radiograph = Radiograph(
            pixels=phantom.image, source=f"phantom-{seed}",
            pixel_spacing_mm=(phantom.pixel_spacing_mm, phantom.pixel_spacing_mm), patient_orientation=["L", "F"],
        )
        t0 = time.perf_counter()
        result = pipeline(radiograph)
        elapsed += time.perf_counter() - t0
        truth = phantom.truth(truth_scoring(pipeline))
        zone_hits = sum(int(a == b) for a, b in zip(result.scores.binary, truth.binary))
        rows.append(
            {
                "seed": seed,
                "lung_dice": dice(result.lungs, phantom.lungs),
                "score": result.scores.total,
                "truth": truth.total,
                "brixia": result.scores.brixia_total,
                "truth_brixia": truth.brixia_total,
                "zone_hits": zone_hits,
                "brixia_error": abs(result.scores.brixia_total - truth.brixia_total),
                "p_disease": result.p_disease,
                "truth_zones": "".join(str(z) for z in truth.binary),
                "fractions": zone_fractions(result.scores),
            }
        )
        probs.append(result.p_disease)
        labels.append(int(phantom.has_disease))
        if phantom.has_disease:
            disease_dices.append(dice(result.disease, phantom.disease))
    lung = np.array([r["lung_dice"] for r in rows])
    err = np.array([abs(r["score"] - r["truth"]) for r in rows])
    return Evaluation(
        images=images,
        lung_dice=float(lung.mean()),
        lung_dice_min=float(lung.min()),
        score_mae=float(err.mean()),
        score_exact=float((err == 0).mean()),
        zone_accuracy=float(sum(r["zone_hits"] for r in rows) / (6 * images)),
        brixia_mae=float(np.mean([r["brixia_error"] for r in rows])),
        auc=roc_auc(np.array(probs), np.array(labels)),
        disease_dice=float(np.mean(disease_dices)) if disease_dices else float("nan"),
        seconds_per_image=elapsed / images,
        per_image=rows,
    )
