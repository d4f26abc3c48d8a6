"""The published covid_scoring inference (Danilov et al. 2022), re-implemented as a baseline.

Follows ViacheslavDanilov/covid_scoring at 1696bcf step by step (``inference.py``,
``CovidScoringNet`` in ``tools/models.py``, ``tools/utils.py``; read in
/work/shared/research/published-code.md):

1. The image as ``cv2.imread`` gives it (8-bit, 3 channels), ``cv2.resize`` (bilinear) to the
   lung model's input size. Everything after works on this downsampled image.
2. ``ToTensor``, ``Resize`` (bicubic), ``Normalize``; Stage I in eager fp32, batch 1;
   threshold > 0.5.
3. ``filter_img``: contours under 6000 px (at 512 px; scaled with the input size) removed,
   then a 5x5 elliptic open (2 iterations) and close.
4. ``single_crop``: image times mask, cropped to the union bounding box of the remaining
   blobs (the whole image if none), resized (bicubic) to the Stage II size.
5. Stage II: ``mask = seg * round(cls)``; lung crop and opacity probability resized with
   ``cv2.resize`` to 512 x 512 crop space, where scoring happens.
6. ``separate_lungs``: labels 1 and 2 of an 8-connected labelling (raster order), each lung
   being all mask pixels inside that label's bounding box; image-left first.
7. ``split_lung_into_segments``: rotate 90 degrees clockwise, ``binary_search`` for the
   column cuts at ``sum // 3`` and ``2 * sum // 3`` (row-granular), rotate back.
8. Zone fraction = opacity (> 0.5) area / zone area; score = number of zones with fraction > T.

So that both contenders write the same outputs, the crop-space masks are then brought back to
the source's full resolution and written as the same SEG + SR (:mod:`cxrtriage.inference.dicom_results`),
one image after another, as a straightforward port of the published code would.

Two things differ from the published script, both forced by the inputs: the models' own
preprocessing is honoured (the bundled models are single-channel and histogram-equalised;
the ``danilov2022`` preset is exactly the published 3-channel ImageNet setting), and the
image comes from a DICOM file rather than a PNG export of it.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from cxrtriage.inference.identity import ModelIdentity
from cxrtriage.inference.models import ModelSpec, load_model
from cxrtriage.inference.pipeline import Result
from cxrtriage.inference.preprocess import CropBox
from cxrtriage.inference.radiograph import Radiograph
from cxrtriage.inference.scoring import ScoringConfig, ZoneMasks, ZoneScores, brixia_grade, extent_grade

CROP_SPACE = 512
CONTOUR_AREA_AT_512 = 6000


def filter_img(mask: np.ndarray, contour_area: float) -> np.ndarray:
    """tools/utils.py filter_img: drop small contours, then open (x2) and close."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    for i, contour in enumerate(contours):
        if cv2.contourArea(contour) < contour_area:
            cv2.drawContours(mask, contours, i, 0, -1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel, iterations=2)
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)


def find_obj_bbox(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """tools/utils.py find_obj_bbox: (x1, y1, x2, y2) of every blob."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return [(x, y, x + w, y + h) for x, y, w, h, _ in stats[1:count]]


def separate_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tools/utils.py separate_lungs: labels 1 and 2, bounding-box crops, image-left first."""
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    labels = list(range(1, min(count, 3))) or [0]
    while len(labels) < 2:
        labels.append(labels[-1])
    lungs = []
    for label in labels:
        x, y, w, h, _ = stats[label]
        lung = np.zeros_like(mask)
        lung[y : y + h, x : x + w] = mask[y : y + h, x : x + w]
        lungs.append((centroids[label][0], lung))
    lungs.sort(key=lambda item: item[0])
    return lungs[0][1], lungs[1][1]


def binary_search(rotated: np.ndarray, target: int) -> int:
    """tools/utils.py binary_search: the last column it evaluated (row-granular)."""
    low, high, mid = 0, rotated.shape[1], 0
    while low <= high:
        mid = (low + high) // 2
        area = int(rotated[:, :mid].sum())
        if area < target:
            low = mid + 1
        elif area > target:
            high = mid - 1
        else:
            break
    return mid


def split_lung_into_segments(lung: np.ndarray) -> list[np.ndarray]:
    """tools/utils.py split_lung_into_segments: [lower, middle, upper] zones."""
    rotated = np.rot90(lung > 0, k=-1)
    total = int(rotated.sum())
    cuts = [0, binary_search(rotated, total // 3), binary_search(rotated, 2 * total // 3), rotated.shape[1]]
    segments = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        piece = np.zeros_like(rotated)
        piece[:, lo:hi] = rotated[:, lo:hi]
        segments.append(np.rot90(piece, k=1))
    return segments


class CovidScoringNet:
    """CovidScoringNet.predict, one image at a time, eager fp32, as published."""

    def __init__(self, lungs: ModelSpec, disease: ModelSpec, zone_threshold: float, device: str = "cpu") -> None:
        self.lung_spec, self.disease_spec = lungs, disease
        self.device = torch.device(device)
        self.lung_model = load_model(lungs, self.device).eval()
        self.disease_model = load_model(disease, self.device).eval()
        self.threshold = zone_threshold
        self.contour_area = CONTOUR_AREA_AT_512 * (lungs.input_size / 512) ** 2

    def _tensor(self, image_u8: np.ndarray, spec: ModelSpec) -> torch.Tensor:
        """ToTensor, Resize (bicubic), Normalize; channels as the model was trained."""
        x = TF.to_tensor(image_u8[:, :, : spec.in_channels]).to(self.device)
        x = TF.resize(x, [spec.input_size, spec.input_size], InterpolationMode.BICUBIC, antialias=False)
        return TF.normalize(x, spec.channel_stats()[0], spec.channel_stats()[1])[None]

    def _source_image(self, pixels: np.ndarray) -> np.ndarray:
        """What cv2.imread of the exported 8-bit image gives, resized to the lung size."""
        gray = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if self.lung_spec.equalize:  # the bundled models' training-time preprocessing
            gray = cv2.equalizeHist(gray)
        bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        size = self.lung_spec.input_size
        return cv2.resize(bgr, (size, size))

    def predict(self, radiograph: Radiograph) -> Result:
        image = self._source_image(radiograph.pixels)
        with torch.no_grad():
            lungs = torch.sigmoid(self.lung_model(self._tensor(image, self.lung_spec)))[0, 0].cpu().numpy()
        mask = filter_img((lungs > 0.5).astype(np.uint8), self.contour_area)
        boxes = find_obj_bbox(mask)
        if boxes:
            x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
            x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        else:
            x1, y1, x2, y2 = 0, 0, mask.shape[1], mask.shape[0]
        crop = (image * mask[:, :, None])[y1:y2, x1:x2]
        with torch.no_grad():
            seg, cls = self.disease_model(self._tensor(crop, self.disease_spec))
            covid = (torch.sigmoid(seg) * torch.round(torch.sigmoid(cls))[:, :, None, None])[0, 0].cpu().numpy()
        lung_crop = cv2.resize(mask[y1:y2, x1:x2], (CROP_SPACE, CROP_SPACE))
        covid_crop = cv2.resize(covid, (CROP_SPACE, CROP_SPACE)) > 0.5
        left, right = separate_lungs(lung_crop)
        zones = split_lung_into_segments(left) + split_lung_into_segments(right)
        fractions = [float((covid_crop & z).sum() / max(z.sum(), 1e-14)) for z in zones]
        return self._result(radiograph, lung_crop, covid_crop, left, right, zones, fractions,
                            float(torch.sigmoid(cls).cpu()), (x1, y1, x2, y2))

    def _result(self, radiograph, lung_crop, covid_crop, left, right, zones, fractions, p, box) -> Result:
        """The crop-space outcome as a full-resolution :class:`Result`, for the SEG and SR.

        Published zone order is [image-left lower, middle, upper, image-right lower, middle,
        upper]; zones A-F are [right upper, middle, lower, left upper, middle, lower], the
        patient's right lung being on the image left.
        """
        rows, cols = radiograph.shape
        scale_y, scale_x = rows / self.lung_spec.input_size, cols / self.lung_spec.input_size
        x1, y1, x2, y2 = box
        full_box = CropBox(round(y1 * scale_y), round(y2 * scale_y), round(x1 * scale_x), round(x2 * scale_x))

        def full(mask: np.ndarray) -> np.ndarray:
            h, w = full_box.shape
            patch = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            return full_box.paste(patch, (rows, cols))

        order = [2, 1, 0, 5, 4, 3]
        fractions = [fractions[i] for i in order]
        zone_masks = ZoneMasks.of_planes([full(zones[i]) for i in order], full(left), full(right), 2)
        binary = [int(f > self.threshold) for f in fractions]
        cutoffs = ScoringConfig().brixia_cutoffs
        brixia = [brixia_grade(f, cutoffs) for f in fractions]
        lungs, disease = full(lung_crop), full(covid_crop & (lung_crop > 0))
        scores = ZoneScores(
            fractions=fractions, binary=binary, brixia=brixia, total=sum(binary), brixia_total=sum(brixia),
            extent_right=extent_grade(float(np.mean(fractions[:3]))), extent_left=extent_grade(float(np.mean(fractions[3:]))),
            zone_threshold=self.threshold, lungs_found=2, lung_area_px=int(lungs.sum()), lesion_area_px=int(disease.sum()),
        )
        return Result(
            source=radiograph.source, lungs=lungs, disease=disease, zones=zone_masks, scores=scores, p_disease=p,
            timings_ms={}, models={"lungs": self.lung_spec.version, "disease": self.disease_spec.version},
            identity=ModelIdentity.from_specs(self.lung_spec, self.disease_spec),
            sop_instance_uid=radiograph.sop_instance_uid, study_instance_uid=radiograph.study_instance_uid,
        )
