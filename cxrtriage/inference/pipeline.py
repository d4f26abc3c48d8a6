"""The two-stage scoring pipeline of Danilov et al. 2022, at full resolution.

Stage I segments the lungs on the whole image. The lung mask is applied to
the image (everything else set to 0) and the image cropped to the lungs'
bounding box; Stage II, a multi-task model, segments opacity in that crop and
gives P(disease). The refined disease mask is the opacity probability gated
by P(disease) >= 0.5. Unlike the published code, which scores a 512x512 crop,
all masks are brought back to the source image's full resolution and scored
there, so they can be written as a DICOM Segmentation of the source.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from .. import __version__
from ..config import InferenceSettings
from .identity import ModelIdentity
from .models import ModelSpec
from .predictors import Predictor, make_predictor
from .preprocess import equalize, lung_box, masked_lung_crop, normalise, resize
from .presets import model_specs, scoring_config
from .radiograph import Radiograph
from .result_model import ImageResult
from .scoring import ZoneMasks, ZoneScores, largest_components, remove_small_components, score

PIPELINE_VERSION = "1"


@dataclass
class Result:
    """Masks (full resolution, source orientation) and scores of one radiograph."""

    source: str
    lungs: np.ndarray
    disease: np.ndarray
    zones: ZoneMasks
    scores: ZoneScores
    p_disease: float
    timings_ms: dict[str, float]
    models: dict[str, str]
    identity: ModelIdentity
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None

    @property
    def algorithm_version(self) -> str:
        """Short (fits a DICOM LO): package and pipeline versions plus a hash of the models."""
        digest = hashlib.sha1(f"{self.models['lungs']}|{self.models['disease']}".encode()).hexdigest()[:10]
        return f"{__version__}-p{PIPELINE_VERSION}-{digest}"

    @property
    def software_versions(self) -> list[str]:
        """For Software Versions (0018,1020): the short version, then each model's."""
        return [self.algorithm_version, self.models["lungs"][:64], self.models["disease"][:64]]

    def as_dict(self) -> dict[str, Any]:
        """The :class:`~.result_model.ImageResult` record, as plain JSON-ready data."""
        return self.record().model_dump()

    def record(self) -> ImageResult:
        return ImageResult.model_validate({
            "source": self.source,
            "sop_instance_uid": self.sop_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "rows": int(self.lungs.shape[0]),
            "columns": int(self.lungs.shape[1]),
            "p_disease": round(self.p_disease, 4),
            **self.scores.as_dict(),
            "models": self.models,
            "model_identity": self.identity.as_dict(),
            "research_use": self.identity.research_use,
            "algorithm_version": self.algorithm_version,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
        })


def clean_lung_probabilities(prob: np.ndarray, threshold: float, min_fraction: float) -> np.ndarray:
    """Zero the probability outside blobs that survive the threshold and size filter.

    A small opening and closing (the published code does the same) removes
    speckle and fills pinholes before small blobs are dropped.
    """
    mask = prob > threshold
    side = max(3, (min(prob.shape) // 100) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    return prob * remove_small_components(mask, min_fraction)


def lung_blobs(prob: np.ndarray, threshold: float, min_fraction: float, shape: tuple[int, int]) -> list[np.ndarray]:
    """The (at most) two lungs as full-resolution masks, largest first, separated at the model's resolution.

    Cleaning, labelling and choosing the two largest components run on the
    model's output (256 x 256), where they cost a fraction of a millisecond;
    each kept component's probability is then brought to the image's size
    and thresholded, once. Two components are at least one model pixel apart,
    so their full-resolution masks never overlap, and no 5-megapixel mask is
    labelled (that cost about 35 CPU-ms per labelling).
    """
    cleaned = clean_lung_probabilities(prob, threshold, min_fraction)
    return [resize(cleaned * blob, shape) > threshold for blob in largest_components(cleaned > threshold, 2)]


class Pipeline:
    """Radiographs in, :class:`Result` out. Build once; call per image or batch."""

    def __init__(
        self,
        settings: InferenceSettings | None = None,
        lungs: Predictor | None = None,
        disease: Predictor | None = None,
    ) -> None:
        self.settings = settings or InferenceSettings()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        if lungs is None or disease is None:
            lung_spec, disease_spec = model_specs(self.settings)
            backend, device, precision = self.settings.backend, self.settings.device, self.settings.precision
            lungs = lungs or make_predictor(lung_spec, backend, device, precision)
            disease = disease or make_predictor(disease_spec, backend, device, precision)
        self.lungs_model = lungs
        self.disease_model = disease
        self.identity = ModelIdentity.from_specs(lungs.spec, disease.spec)  # fixed for the pipeline's life
        self.scoring = scoring_config(self.settings, disease.spec)

    @property
    def model_versions(self) -> dict[str, str]:
        return {"lungs": self.lungs_model.spec.version, "disease": self.disease_model.spec.version}


    def _inputs(self, images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
        mean, std = spec.channel_stats()
        size = (spec.input_size, spec.input_size)
        return np.stack([normalise(resize(im, size), mean, std) for im in images])

    def __call__(self, radiograph: Radiograph) -> Result:
        return self.run_batch([radiograph])[0]

    def run_batch(self, radiographs: Sequence[Radiograph]) -> list[Result]:
        """Score several radiographs; each model runs once per batch."""
        if not radiographs:
            return []
        t0 = time.perf_counter()
        lung_spec = self.lungs_model.spec
        disease_spec = self.disease_model.spec
        equalized = [equalize(r.pixels) for r in radiographs] if lung_spec.equalize or disease_spec.equalize else []
        stage1_images = equalized if lung_spec.equalize else [r.pixels for r in radiographs]
        stage2_images = equalized if disease_spec.equalize else [r.pixels for r in radiographs]
        lung_probs, _ = self.lungs_model(self._inputs(stage1_images, lung_spec))
        t1 = time.perf_counter()

        lung_masks, blobs, boxes, crops = [], [], [], []
        for r, image, prob in zip(radiographs, stage2_images, lung_probs):
            kept = lung_blobs(prob, lung_spec.pixel_threshold, self.settings.min_lung_blob_fraction, r.shape)
            full = np.logical_or.reduce(kept) if kept else np.zeros(r.shape, dtype=bool)
            box = lung_box(full, self.settings.crop_margin)
            lung_masks.append(full)
            blobs.append(kept)
            boxes.append(box)
            crops.append(masked_lung_crop(image, full, box))
        t2 = time.perf_counter()

        seg_probs, p_disease = self.disease_model(self._inputs(crops, disease_spec))
        if p_disease is None:  # a segmentation-only Stage II model: gate on the mask itself
            p_disease = np.array([float(p.max()) for p in seg_probs])
        t3 = time.perf_counter()

        results = []
        per_image = 1.0 / len(radiographs)
        for r, lungs, kept, box, seg, p in zip(radiographs, lung_masks, blobs, boxes, seg_probs, p_disease):
            t_post = time.perf_counter()
            refined = seg * float(p >= 0.5)
            disease = box.paste(resize(refined, box.shape) > disease_spec.pixel_threshold, r.shape) & lungs
            scores, zones = score(
                lungs, disease, self.scoring, r.patient_orientation, r.image_laterality, r.pixel_spacing_mm, kept
            )
            results.append(
                Result(
                    source=r.source,
                    lungs=lungs,
                    disease=disease,
                    zones=zones,
                    scores=scores,
                    p_disease=float(p),
                    timings_ms={
                        "stage1": (t1 - t0) * 1000 * per_image,
                        "crop": (t2 - t1) * 1000 * per_image,
                        "stage2": (t3 - t2) * 1000 * per_image,
                        "scoring": (time.perf_counter() - t_post) * 1000,
                    },
                    models=self.model_versions,
                    identity=self.identity,
                    sop_instance_uid=r.sop_instance_uid,
                    study_instance_uid=r.study_instance_uid,
                )
            )
        return results
