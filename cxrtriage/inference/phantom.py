"""Synthetic chest radiographs with exact ground truth.

Each :class:`Phantom` is drawn from a seed: a body outline, two lungs of
varied shape and size, heart and mediastinum, spine, ribs, clavicles and the
diaphragm, with exposure, noise and blur variation, and optionally
ground-glass or consolidation-like opacities placed in chosen lung zones.
The truth (lung masks per side, disease mask, zone fractions and scores) is
computed with the same :mod:`cxrtriage.inference.scoring` zones the pipeline
uses, so truth and prediction are compared on one definition.

The images are for training the bundled demonstration models, for tests and
for demos. They are not a model of real anatomy or disease.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .scoring import ScoringConfig, ZoneMasks, ZoneScores, lung_zones, score_zones

#: Lung outline control points of the image-left lung (the patient's right),
#: as (x, y) in its bounding box: apex, lateral wall, costophrenic angle,
#: diaphragm dome, medial border.
_LUNG_OUTLINE = np.array(
    [
        (0.62, 0.00),
        (0.30, 0.06),
        (0.10, 0.28),
        (0.02, 0.62),
        (0.00, 1.00),
        (0.30, 0.90),
        (0.60, 0.83),
        (0.95, 0.80),
        (0.93, 0.45),
        (0.85, 0.12),
    ]
)


@dataclass(frozen=True)
class Thorax:
    """Placement of the chest in the image, as fractions of its width and height."""

    cx: float  # midline
    top: float  # lung apices
    bottom: float  # costophrenic angles
    half_width: float  # midline to the lateral lung wall
    gap: float  # midline to the medial lung border


@dataclass
class Phantom:
    """A synthetic radiograph and its truth (canonical PA orientation).

    ``image`` is float32 in [0, 1] as displayed (MONOCHROME2: air dark, bone
    bright). Masks are boolean at the image's resolution.
    """

    seed: int
    image: np.ndarray
    right_lung: np.ndarray
    left_lung: np.ndarray
    disease: np.ndarray
    affected_zones: tuple[int, ...]
    pixel_spacing_mm: float

    @property
    def lungs(self) -> np.ndarray:
        return self.right_lung | self.left_lung

    @property
    def has_disease(self) -> bool:
        return bool(self.disease.any())

    def zones(self) -> ZoneMasks:
        return ZoneMasks.of_planes(lung_zones(self.right_lung) + lung_zones(self.left_lung), self.right_lung,
                                   self.left_lung, lungs_found=2)

    def truth(self, config: ScoringConfig | None = None) -> ZoneScores:
        spacing = (self.pixel_spacing_mm, self.pixel_spacing_mm)
        return score_zones(self.zones(), self.disease, config, spacing)


def _chaikin(points: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon."""
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0)
        points = np.concatenate([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt])
        order = np.arange(len(points)).reshape(2, -1).T.ravel()
        points = points[order]
    return points


def _fill(shape: tuple[int, int], points_xy: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(canvas, [np.round(points_xy * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigmaX=max(sigma, 0.5))
    std = float(noise.std()) or 1.0
    return (noise - float(noise.mean())) / std


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=max(sigma, 0.3))


class PhantomGenerator:
    """Draws :class:`Phantom` images; the same seed always gives the same image.

    Parameters
    ----------
    height, width:
        Output size in pixels. When ``None``, each phantom gets a random size
        around 512 with an aspect ratio between 0.8 and 1.25.
    p_normal:
        Probability that a phantom has no opacity at all.
    pixel_spacing_mm:
        Nominal detector pixel spacing at 2048 pixels of height; it scales
        with the output size so the anatomy stays about 35-43 cm tall.
    """

    def __init__(
        self,
        height: int | None = 512,
        width: int | None = 512,
        p_normal: float = 0.3,
        pixel_spacing_mm: float = 0.2,
    ) -> None:
        self.height = height
        self.width = width
        self.p_normal = p_normal
        self.pixel_spacing_mm = pixel_spacing_mm

    def __call__(self, seed: int, affected_zones: tuple[int, ...] | None = None) -> Phantom:
        """Draw phantom ``seed``; ``affected_zones`` (indices 0-5) overrides the random choice."""
        rng = np.random.default_rng(seed)
        h, w = self._size(rng)
        xs = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
        ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]

        t = Thorax(
            cx=0.5 + rng.uniform(-0.04, 0.04),
            top=rng.uniform(0.05, 0.2),
            bottom=rng.uniform(0.7, 0.9),
            half_width=rng.uniform(0.3, 0.46),
            gap=rng.uniform(0.025, 0.06),
        )
        right_lung, left_lung = self._lungs(rng, (h, w), t)
        heart = self._heart(rng, (h, w), t)
        right_lung &= ~heart
        left_lung &= ~heart

        body = self._body(rng, xs, ys, t.cx, t.half_width)
        lungs = (right_lung | left_lung).astype(np.float32)
        lung_soft = _blur(lungs, 0.006 * h)

        density = 0.55 * body
        density += 0.18 * _blur(((ys > t.bottom - 0.1) & (body > 0.5)).astype(np.float32), 0.02 * h)
        density -= rng.uniform(0.2, 0.42) * lung_soft
        density += rng.uniform(0.05, 0.14) * _blur(heart.astype(np.float32), 0.01 * h)
        # Mediastinum between the lungs, and broad soft-tissue shadows (breasts, muscle).
        density += rng.uniform(0.04, 0.12) * np.exp(-(((xs - t.cx) / (t.gap + 0.04)) ** 2)).astype(np.float32) * body
        density += rng.uniform(0.0, 0.06) * _smooth_noise(rng, (h, w), 0.12 * h) * body
        density += self._spine(rng, xs, ys, t.cx)
        density += self._ribs(rng, (h, w), t) * (0.4 + 0.6 * body)
        density += self._clavicles(rng, (h, w), t)
        # Vessel markings: fine texture, strongest near the hila.
        hilum = np.exp(-(((xs - t.cx) / 0.25) ** 2)).astype(np.float32)
        density += 0.03 * _smooth_noise(rng, (h, w), 0.004 * h) * lung_soft * hilum

        zones = lung_zones(right_lung) + lung_zones(left_lung)
        disease, zone_choice = self._disease(rng, zones, right_lung | left_lung, affected_zones)
        density += self._opacity(rng, disease, h)

        image = self._expose(rng, density, h)
        return Phantom(
            seed=seed,
            image=image,
            right_lung=right_lung,
            left_lung=left_lung,
            disease=disease,
            affected_zones=zone_choice,
            pixel_spacing_mm=self.pixel_spacing_mm * 2048 / h,
        )

    # -- geometry -------------------------------------------------------

    def _size(self, rng: np.random.Generator) -> tuple[int, int]:
        if self.height and self.width:
            return self.height, self.width
        base = int(rng.integers(448, 577))
        aspect = rng.uniform(0.8, 1.25)
        return base, int(round(base * aspect))

    def _lungs(self, rng: np.random.Generator, shape: tuple[int, int], t: Thorax) -> tuple[np.ndarray, np.ndarray]:
        h, w = shape
        cx, top, bottom, half_width, gap = t.cx, t.top, t.bottom, t.half_width, t.gap
        masks = []
        for side in (-1, 1):  # -1: image left = patient right
            lung_w = (half_width - gap) * rng.uniform(0.9, 1.05)
            lung_top = top + rng.uniform(-0.02, 0.03)
            lung_bottom = bottom + rng.uniform(-0.04, 0.03) - (0.02 if side == 1 else 0.0)
            pts = _LUNG_OUTLINE + rng.normal(0.0, 0.025, _LUNG_OUTLINE.shape)
            x = pts[:, 0] if side == -1 else 1.0 - pts[:, 0]
            x0 = cx - gap - lung_w if side == -1 else cx + gap
            px = (x0 + x * lung_w) * (w - 1)
            py = (lung_top + pts[:, 1] * (lung_bottom - lung_top)) * (h - 1)
            masks.append(_fill(shape, _chaikin(np.stack([px, py], axis=1))))
        return masks[0], masks[1]

    def _heart(self, rng: np.random.Generator, shape: tuple[int, int], t: Thorax) -> np.ndarray:
        h, w = shape
        cx, top, bottom, half_width = t.cx, t.top, t.bottom, t.half_width
        centre = (
            (cx + rng.uniform(0.03, 0.08)) * (w - 1),
            (bottom - rng.uniform(0.1, 0.16) * (bottom - top) * 2.2) * (h - 1),
        )
        axes = (half_width * rng.uniform(0.38, 0.52) * w, (bottom - top) * rng.uniform(0.2, 0.27) * h)
        canvas = np.zeros(shape, dtype=np.uint8)
        cv2.ellipse(
            canvas,
            (int(centre[0]), int(centre[1])),
            (max(int(axes[0]), 1), max(int(axes[1]), 1)),
            float(rng.uniform(-25, -5)),
            0,
            360,
            1,
            -1,
        )
        return canvas.astype(bool)

    def _body(
        self, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, cx: float, half_width: float
    ) -> np.ndarray:
        body_half = half_width + rng.uniform(0.06, 0.3)  # wide bodies fill the detector
        # Shoulders widen towards the top; the abdomen narrows slightly.
        bulge = 1.0 + 0.12 * np.exp(-((ys - 0.08) / 0.1) ** 2) - 0.06 * ys
        inside = np.abs(xs - cx) / (body_half * bulge)
        return np.clip(1.4 - inside**4, 0.0, 1.0).astype(np.float32)

    def _spine(self, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, cx: float) -> np.ndarray:
        width = rng.uniform(0.025, 0.035)
        column = np.exp(-(((xs - cx) / width) ** 4)).astype(np.float32)
        # Vertebrae: periodic brightness along the spine.
        period = rng.uniform(0.045, 0.06)
        vertebrae = 0.8 + 0.2 * np.cos(2 * np.pi * ys / period).astype(np.float32)
        return 0.22 * column * vertebrae

    def _ribs(self, rng: np.random.Generator, shape: tuple[int, int], t: Thorax) -> np.ndarray:
        h, w = shape
        cx, top, bottom, half_width = t.cx, t.top, t.bottom, t.half_width
        canvas = np.zeros(shape, dtype=np.float32)
        n_ribs = int(rng.integers(8, 11))
        spacing = (bottom - top) / n_ribs
        thickness = max(1, int(rng.uniform(0.011, 0.016) * h))
        along = np.linspace(0.0, 1.0, 40)
        for i in range(n_ribs):
            y_med = top + (i + 0.2) * spacing
            for side in (-1, 1):
                # Posterior rib: leaves the spine and curves down laterally.
                x = cx + side * (0.03 + along * (half_width + 0.03))
                y = y_med + 0.9 * spacing * np.sin(along * np.pi * 0.75) + rng.normal(0, 0.004)
                pts = np.stack([x * (w - 1), y * (h - 1)], axis=1).astype(np.int32)
                cv2.polylines(canvas, [pts], False, float(rng.uniform(0.07, 0.15)), thickness)
        return _blur(canvas, 0.003 * h)

    def _clavicles(self, rng: np.random.Generator, shape: tuple[int, int], t: Thorax) -> np.ndarray:
        h, w = shape
        cx, top, half_width = t.cx, t.top, t.half_width
        canvas = np.zeros(shape, dtype=np.float32)
        thickness = max(1, int(rng.uniform(0.018, 0.026) * h))
        for side in (-1, 1):
            start = (cx + side * 0.04, top + rng.uniform(-0.01, 0.03))
            end = (cx + side * (half_width + 0.02), top - rng.uniform(0.02, 0.06))
            pts = np.array([[start[0] * (w - 1), start[1] * (h - 1)], [end[0] * (w - 1), end[1] * (h - 1)]])
            cv2.polylines(canvas, [pts.astype(np.int32)], False, 0.14, thickness)
        return _blur(canvas, 0.004 * h)

    # -- disease --------------------------------------------------------

    def _disease(
        self,
        rng: np.random.Generator,
        zones: tuple[np.ndarray, ...],
        lungs: np.ndarray,
        affected_zones: tuple[int, ...] | None,
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        if affected_zones is None:
            if rng.random() < self.p_normal:
                affected_zones = ()
            else:
                count = int(rng.integers(1, 7))
                affected_zones = tuple(sorted(rng.choice(6, size=count, replace=False).tolist()))
        h = lungs.shape[0]
        disease = np.zeros_like(lungs)
        for k in range(6):
            zone = zones[k]
            if not zone.any():
                continue
            if k in affected_zones:
                target = rng.uniform(0.5, 0.95)  # clearly above the 0.30 threshold
            elif affected_zones and rng.random() < 0.3:
                target = rng.uniform(0.02, 0.12)  # small spill-over, clearly below
            else:
                continue
            field = _smooth_noise(rng, lungs.shape, rng.uniform(0.02, 0.05) * h)
            values = field[zone]
            cut = np.quantile(values, 1.0 - target)
            disease |= zone & (field >= cut)
        # Soften the straight cuts at zone borders; truth is measured afterwards.
        disease = (_blur(disease.astype(np.float32), 0.008 * h) > 0.5) & lungs
        return disease, tuple(affected_zones)

    def _opacity(self, rng: np.random.Generator, disease: np.ndarray, h: int) -> np.ndarray:
        if not disease.any():
            return np.zeros(disease.shape, dtype=np.float32)
        kind = rng.choice(["ground_glass", "consolidation", "mixed"])
        strength = {"ground_glass": (0.14, 0.22), "consolidation": (0.26, 0.4), "mixed": (0.18, 0.32)}[kind]
        texture = 1.0 + 0.25 * _smooth_noise(rng, disease.shape, 0.006 * h)
        soft = _blur(disease.astype(np.float32), 0.004 * h)
        return rng.uniform(*strength) * soft * texture

    # -- detector -------------------------------------------------------

    def _expose(self, rng: np.random.Generator, density: np.ndarray, h: int) -> np.ndarray:
        image = _blur(density, rng.uniform(0.0005, 0.002) * h)
        image = np.clip(image, 0.0, 1.0)
        gamma = rng.uniform(0.55, 1.6)
        image = image**gamma
        contrast = rng.uniform(0.8, 1.15)
        brightness = rng.uniform(-0.06, 0.08)
        image = (image - 0.5) * contrast + 0.5 + brightness
        image += rng.uniform(0.005, 0.025) * rng.standard_normal(image.shape).astype(np.float32)
        return np.clip(image, 0.0, 1.0).astype(np.float32)


def write_cr(
    phantom: Phantom,
    path: str | Path,
    *,
    monochrome1: bool = False,
    bits_stored: int = 12,
    patient_id: str | None = None,
    study_uid: str | None = None,
    mirrored: bool = False,
    requested_priority: str | None = None,
) -> Path:
    """Write a phantom as a DICOM CR Image (PS3.3 A.2) with fresh UIDs.

    ``mirrored`` flips the image left-right and sets Patient Orientation to
    ``R\\F`` so the patient's right is on the image right: readers that honour
    Patient Orientation must still find the right lung.
    """
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage as CRImageStorage
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image = phantom.image[:, ::-1] if mirrored else phantom.image
    max_value = (1 << bits_stored) - 1
    values = np.round(image * max_value).astype(np.uint16)
    if monochrome1:
        values = (max_value - values).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    now = _dt.datetime.now()
    ds.SOPClassUID = CRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = f"PHANTOM^{phantom.seed}"
    ds.PatientID = patient_id or f"PH{phantom.seed:08d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = f"A{phantom.seed:08d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDescription = "Synthetic chest radiograph (cxrtriage phantom)"
    ds.SeriesDescription = "PA chest"
    ds.Manufacturer = "cxrtriage phantom"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["R", "F"] if mirrored else ["L", "F"]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ImageComments = "SYNTHETIC PHANTOM - NOT A PATIENT"
    ds.PixelSpacing = [f"{phantom.pixel_spacing_mm:.6f}"] * 2
    ds.ImagerPixelSpacing = ds.PixelSpacing
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = f"{max_value / 2:.1f}"
    ds.WindowWidth = f"{max_value + 1}"
    ds.PixelData = values.tobytes()
    if requested_priority:
        # As a modality copies it from the worklist: Request Attributes Sequence (PS3.3 C.4.10).
        request = Dataset()
        request.RequestedProcedurePriority = requested_priority
        request.RequestedProcedureID = ds.AccessionNumber
        ds.RequestAttributesSequence = [request]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
