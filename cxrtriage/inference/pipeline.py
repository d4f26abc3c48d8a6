"""The two-stage scoring pipeline of Danilov et al. 2022, at full resolution.

Stage I segments the lungs on the whole image. The lung mask is applied to
the image (everything else set to 0) and the image cropped to the lungs'
bounding box; Stage II, a multi-task model, segments opacity in that crop and
gives P(disease). The refined disease mask is the opacity probability gated
by P(disease) >= 0.5 (or the disease model's own ``disease_gate``). Unlike
the published code, which scores a 512x512 crop, all masks are brought back
to the source image's full resolution and scored there, so they can be
written as a DICOM Segmentation of the source.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping, Sequence
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
from .preprocess import CropBox, lung_box, masked_lung_crop, normalise, resize
from .presets import model_specs, scoring_config
from .radiograph import Radiograph, lookup
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
    disease_gate: float = 0.5  # the P(disease) at or above which the opacity counted (ModelSpec.disease_gate)

    @property
    def algorithm_version(self) -> str:
        """Short (fits a DICOM LO): package and pipeline versions plus a hash of the models (and of a P(disease)
        gate other than the paper's 0.5: the same models then give other results)."""
        gate = f"|gate={self.disease_gate:g}" if self.disease_gate != 0.5 else ""
        digest = hashlib.sha1(f"{self.models['lungs']}|{self.models['disease']}{gate}".encode()).hexdigest()[:10]
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
            "disease_gate": self.disease_gate,
            **self.scores.as_dict(),
            "models": self.models,
            "model_identity": self.identity.as_dict(),
            "research_use": self.identity.research_use,
            "algorithm_version": self.algorithm_version,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
        })


def lung_kernel(shape: tuple[int, ...]) -> np.ndarray:
    """The elliptic structuring element (uint8, odd side) of :func:`clean_lung_probabilities` for a map of
    ``shape``: about 1 % of its side, at least 3."""
    side = max(3, (min(shape) // 100) | 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))


def clean_lung_probabilities(prob: np.ndarray, threshold: float, min_fraction: float) -> np.ndarray:
    """Zero the probability outside blobs that survive the threshold and size filter.

    A small opening and closing (the published code does the same) removes
    speckle and fills pinholes before small blobs are dropped.
    """
    mask = prob > threshold
    kernel = lung_kernel(prob.shape)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    return prob * remove_small_components(mask, min_fraction)


def use_threads(threads: int) -> None:
    """Give torch and OpenCV ``threads`` CPU threads each in this process; 0 leaves their defaults (all cores).

    A worker process per core wants one each: OpenCV's own pool otherwise starts a thread per core in every
    worker for each resize, 16 x 16 threads on a 16-core GPU box, waiting on one another's stragglers.
    """
    if threads > 0:  # cv2.setNumThreads(0) would mean "no threads", not "the default"
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)


def model_blobs(prob: np.ndarray, threshold: float, min_fraction: float) -> list[np.ndarray]:
    """The (at most) two lungs' cleaned probabilities at the model's resolution, largest first.

    Cleaning, labelling and choosing the two largest components run on the
    model's output (256 x 256), where they cost a fraction of a millisecond.
    """
    cleaned = clean_lung_probabilities(prob, threshold, min_fraction)
    return [cleaned * blob for blob in largest_components(cleaned > threshold, 2)]


def lung_masks(
    prob: np.ndarray, threshold: float, min_fraction: float, shape: tuple[int, int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The lungs' union and the (at most) two lungs as full-resolution masks, largest first, separated at the
    model's resolution.

    Each kept component's probability (:func:`model_blobs`) is brought to the
    image's size and thresholded, once. Two components are at least one model
    pixel apart, so their full-resolution masks never overlap, and no
    5-megapixel mask is labelled (that cost about 35 CPU-ms per labelling).

    Where the two blobs lie on either side of at least :data:`SPLIT_GAP` empty
    model rows or columns, their sum is upsampled once and cut along the gap:
    bilinear interpolation reads a 2 x 2 block of model pixels, which never
    holds both blobs (they are 8-separated), so each full-resolution value is
    the one its own blob's upsample gives, and the cut sits between their supports.
    """
    blobs = model_blobs(prob, threshold, min_fraction)
    cut = _blob_cut(blobs, prob.shape, shape) if len(blobs) == 2 else None
    if cut is None:
        kept = [resize(blob, shape) > threshold for blob in blobs]
        # Pairwise OR: np.logical_or.reduce(list) first stacks the masks into one (n, H, W) copy.
        full = functools.reduce(np.logical_or, kept) if kept else np.zeros(shape, dtype=bool)
        return full, kept
    axis, at, first_before = cut
    full = resize(blobs[0] + blobs[1], shape) > threshold
    before, after = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    if axis == 0:
        before[:at], after[at:] = full[:at], full[at:]
    else:
        before[:, :at], after[:, at:] = full[:, :at], full[:, at:]
    return full, ([before, after] if first_before else [after, before])


#: Empty model rows or columns needed between the blobs for :func:`lung_masks`' single upsample.
SPLIT_GAP = 2


def _blob_cut(
    blobs: list[np.ndarray], source: tuple[int, int], shape: tuple[int, int]
) -> tuple[int, int, bool] | None:
    """(axis, full-resolution index, whether blob 0 lies before it) of a cut between the two blobs, or None.

    Only where :func:`~.preprocess.resize` enlarges by at least 2 along the cut's
    axis and interpolates bilinearly (OpenCV's ``fx = (x + 0.5) * S / W - 0.5``).
    """
    if shape[0] < source[0] and shape[1] < source[1]:  # area averaging: not a 2 x 2 read
        return None
    for axis in (1, 0):
        if shape[axis] < 2 * source[axis]:
            continue
        spans = [np.flatnonzero(blob.any(axis=1 - axis)) for blob in blobs]
        (a0, a1), (b0, b1) = [(int(s[0]), int(s[-1])) for s in spans]
        first_before = a1 < b0
        low_end, high_start = (a1, b0) if first_before else (b1, a0)
        if high_start - low_end - 1 < SPLIT_GAP:
            continue
        # The cut's full-resolution index maps to model coordinate g + 0.5, g = low_end + 1 the first empty
        # line: indices below it read model lines <= g + 1 (empty or the low blob's), those from it >= g.
        g = low_end + 1
        at = int(round((g + 1) * shape[axis] / source[axis] - 0.5))
        return axis, at, first_before
    return None


def stage_sources(
    radiograph: Radiograph, lung_spec: ModelSpec, disease_spec: ModelSpec
) -> tuple[np.ndarray, np.ndarray]:
    """The images Stage I and Stage II start from: the pixels, or their equalised copy where a model wants it
    (made from the stored values where the radiograph keeps them: the pixels themselves are then never made)."""
    if not (lung_spec.equalize or disease_spec.equalize):
        return radiograph.pixels, radiograph.pixels
    equalized = radiograph.equalized()
    return (equalized if lung_spec.equalize else radiograph.pixels), (
        equalized if disease_spec.equalize else radiograph.pixels)


def stage2_image(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Stage II's source image of a hand-off between processes (:func:`~.engine_jobs.prepare`): ``stage2``, or
    ``table[codes]`` where it went as the radiograph's stored values (:meth:`~.radiograph.Radiograph.as_lookup`)."""
    return arrays["stage2"] if "stage2" in arrays else lookup(arrays["table"], arrays["codes"])


def stage1_input(arrays: Mapping[str, np.ndarray], spec: ModelSpec) -> np.ndarray:
    """Stage I's (C, S, S) input of a hand-off: ``stage1``, or made from Stage II's image where the hand-off left
    it out (both stages start from that image; ``inference.stage1_on_device``)."""
    return arrays["stage1"] if "stage1" in arrays else model_inputs([stage2_image(arrays)], spec)[0]


def model_inputs(images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """(N, C, S, S) float32: each image resized to the model's input and normalised."""
    mean, std = spec.channel_stats()
    size = (spec.input_size, spec.input_size)
    return np.stack([normalise(resize(im, size), mean, std) for im in images])


@dataclass
class LungCrop:
    """Stage I's outcome for one image: full-resolution lungs, their box, and the masked crop for Stage II."""

    lungs: np.ndarray
    blobs: list[np.ndarray]
    box: CropBox
    crop: np.ndarray


def lung_crop(
    image: np.ndarray, prob: np.ndarray, threshold: float, min_fraction: float, margin: float
) -> LungCrop:
    """Lung masks from Stage I's ``prob``, and ``image`` masked and cropped to them (Danilov's single crop)."""
    full, kept = lung_masks(prob, threshold, min_fraction, image.shape)
    box = lung_box(full, margin)
    return LungCrop(full, kept, box, masked_lung_crop(image, full, box))


def disease_mask(seg: np.ndarray, p: float, threshold: float, box: CropBox, lungs: np.ndarray,
                 gate: float = 0.5) -> np.ndarray:
    """Full-resolution disease mask: Stage II's opacity gated by P(disease) >= ``gate`` (the paper's 0.5, or the
    disease model's own ``disease_gate``), upsampled into ``box``, inside the lungs.

    Only the box is thresholded and ANDed with the lungs (outside it the mask is 0 whatever the lungs);
    ``box.paste(resize(seg * (p >= gate), box.shape) > threshold, lungs.shape) & lungs``, without a full-size AND.
    """
    refined = seg * float(p >= gate)
    disease = np.zeros(lungs.shape, dtype=bool)
    np.logical_and(resize(refined, box.shape) > threshold, box.take(lungs), out=box.take(disease))
    return disease


class ResultBuilder:
    """Stage II's output at model resolution -> the full-resolution disease mask, zone scores and :class:`Result`.

    Needs the model specs only, not the models: the scoring engine's CPU
    workers build results with it while the networks run elsewhere.
    """

    def __init__(self, settings: InferenceSettings, lung_spec: ModelSpec, disease_spec: ModelSpec) -> None:
        self.settings = settings
        self.disease_threshold = disease_spec.pixel_threshold
        self.disease_gate = disease_spec.disease_gate
        self.identity = ModelIdentity.from_specs(lung_spec, disease_spec)  # fixed for the pipeline's life
        self.scoring = scoring_config(settings, disease_spec)
        self.model_versions = {"lungs": lung_spec.version, "disease": disease_spec.version}

    def __call__(
        self, r: Radiograph, lungs: np.ndarray, kept: list[np.ndarray], box: CropBox, seg: np.ndarray, p: float,
        timings_ms: dict[str, float],
    ) -> Result:
        t_post = time.perf_counter()
        disease = disease_mask(seg, p, self.disease_threshold, box, lungs, self.disease_gate)
        scores, zones = score(
            lungs, disease, self.scoring, r.patient_orientation, r.image_laterality, r.pixel_spacing_mm, kept
        )
        return Result(
            source=r.source,
            lungs=lungs,
            disease=disease,
            zones=zones,
            scores=scores,
            p_disease=float(p),
            timings_ms={**timings_ms, "scoring": (time.perf_counter() - t_post) * 1000},
            models=dict(self.model_versions),
            identity=self.identity,
            sop_instance_uid=r.sop_instance_uid,
            study_instance_uid=r.study_instance_uid,
            disease_gate=self.disease_gate,
        )


class Pipeline:
    """Radiographs in, :class:`Result` out. Build once; call per image or batch."""

    def __init__(
        self,
        settings: InferenceSettings | None = None,
        lungs: Predictor | None = None,
        disease: Predictor | None = None,
    ) -> None:
        self.settings = settings or InferenceSettings()
        use_threads(self.settings.threads)
        if lungs is None or disease is None:
            lung_spec, disease_spec = model_specs(self.settings)
            backend, device, precision = self.settings.backend, self.settings.device, self.settings.precision
            compile = self.settings.compile
            fold = self.settings.fold_batch_norm
            lungs = lungs or make_predictor(lung_spec, backend, device, precision, compile, fold)
            disease = disease or make_predictor(disease_spec, backend, device, precision, compile, fold)
        self.lungs_model = lungs
        self.disease_model = disease
        self.build_result = ResultBuilder(self.settings, lungs.spec, disease.spec)
        self.identity = self.build_result.identity
        self.scoring = self.build_result.scoring

    @property
    def model_versions(self) -> dict[str, str]:
        return {"lungs": self.lungs_model.spec.version, "disease": self.disease_model.spec.version}

    def __call__(self, radiograph: Radiograph) -> Result:
        return self.run_batch([radiograph])[0]

    def run_batch(self, radiographs: Sequence[Radiograph]) -> list[Result]:
        """Score several radiographs; each model runs once per batch."""
        if not radiographs:
            return []
        t0 = time.perf_counter()
        lung_spec = self.lungs_model.spec
        disease_spec = self.disease_model.spec
        sources = [stage_sources(r, lung_spec, disease_spec) for r in radiographs]
        lung_probs, _ = self.lungs_model(model_inputs([s[0] for s in sources], lung_spec))
        t1 = time.perf_counter()

        crops = [
            lung_crop(s[1], prob, lung_spec.pixel_threshold, self.settings.min_lung_blob_fraction,
                      self.settings.crop_margin)
            for s, prob in zip(sources, lung_probs)
        ]
        t2 = time.perf_counter()

        seg_probs, p_disease = self.disease_model(model_inputs([c.crop for c in crops], disease_spec))
        if p_disease is None:  # a segmentation-only Stage II model: gate on the mask itself
            p_disease = np.array([float(p.max()) for p in seg_probs])
        t3 = time.perf_counter()

        per_image = 1000.0 / len(radiographs)
        timings = {"stage1": (t1 - t0) * per_image, "crop": (t2 - t1) * per_image, "stage2": (t3 - t2) * per_image}
        return [
            self.build_result(r, c.lungs, c.blobs, c.box, seg, float(p), timings)
            for r, c, seg, p in zip(radiographs, crops, seg_probs, p_disease)
        ]
