"""Lung-zone severity scoring on binary masks.

Array code only (numpy, plus ``scipy.ndimage`` for connected components): no
torch, no OpenCV, so it can be tested exhaustively and reused by the node.

Pipeline of this module:

1. :func:`canonical_transform` reads the DICOM Patient Orientation (0020,0020)
   and says how to flip/transpose the image so that the patient's right is on
   the image left and the head is at the top (the PA/AP display convention).
2. :func:`split_lungs` keeps the two *largest* connected components of the
   lung mask (the published covid_scoring code takes the first two labels in
   raster order and crops by bounding box, which leaks pixels of one lung into
   the other) and names them patient-right / patient-left.
3. :func:`lung_zones` cuts each lung into upper, middle and lower zones of
   exactly equal area: the boundary row is split pixel by pixel, so the three
   areas differ by at most one pixel (the published binary search is only
   row-granular and can be off by a whole row).
4. :func:`score` computes per zone the affected fraction, the binary zone
   score (fraction > T, Danilov et al. 2022 / Toussie et al. 2020, total 0-6),
   a Brixia-style grade 0-3 (zones A-F, Borghesi & Maroldi 2020, total 0-18),
   the geographic-extent score per lung (0-4 by quartile, Wong et al. 2020)
   and areas in mm^2 when the pixel spacing is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy import ndimage

#: Zone names in report order, the project's one definition. A-C are the
#: patient's right lung, upper to lower; D-F the left lung (Brixia convention).
ZONE_NAMES: tuple[str, ...] = (
    "right_upper",
    "right_middle",
    "right_lower",
    "left_upper",
    "left_middle",
    "left_lower",
)
BRIXIA_LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

#: Rows ``top:bottom`` and columns ``left:right`` of an array (half open); (0, 0, 0, 0) holds nothing.
Box = tuple[int, int, int, int]
EMPTY_BOX: Box = (0, 0, 0, 0)


def bounds(mask: np.ndarray) -> Box:
    """The smallest box holding every True pixel of a 2-D mask; :data:`EMPTY_BOX` when there is none.

    Full-resolution scoring works inside these boxes (a lung is about a fifth of a chest film),
    so no step but this one reads the whole 5-megapixel mask.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return EMPTY_BOX
    cols = np.flatnonzero(mask[rows[0]:rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def hull(boxes: Sequence[Box]) -> Box:
    """The smallest box holding each of ``boxes`` (an empty one holds nothing); :data:`EMPTY_BOX` if all are empty."""
    held = [b for b in boxes if b[1] > b[0] and b[3] > b[2]]
    if not held:
        return EMPTY_BOX
    return min(b[0] for b in held), max(b[1] for b in held), min(b[2] for b in held), max(b[3] for b in held)


def take_box(array: np.ndarray, box: Box) -> np.ndarray:
    """``array`` inside ``box`` (a view)."""
    return array[box[0]:box[1], box[2]:box[3]]


def whole_plane(inside: np.ndarray, box: Box, shape: tuple[int, ...]) -> np.ndarray:
    """The bool ``shape`` plane that is ``inside`` within ``box`` and False elsewhere."""
    plane = np.zeros(shape, dtype=bool)
    take_box(plane, box)[...] = inside
    return plane


@dataclass(frozen=True)
class OrientationTransform:
    """How to bring an image into the canonical chest display orientation.

    Applied in order: transpose (swap rows and columns), then flip rows
    (upside down), then flip columns (mirror). :meth:`apply` and
    :meth:`invert` are exact inverses.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = array.T if self.transpose else array
        if self.flip_rows:
            out = out[::-1, :]
        if self.flip_cols:
            out = out[:, ::-1]
        return out

    def invert(self, array: np.ndarray) -> np.ndarray:
        out = array
        if self.flip_cols:
            out = out[:, ::-1]
        if self.flip_rows:
            out = out[::-1, :]
        return out.T if self.transpose else out

    def invert_box(self, box: Box, shape: tuple[int, int]) -> Box:
        """The rectangle that :meth:`invert` carries ``box`` (of an array of ``shape``) to."""
        top, bottom, left, right = box
        if self.flip_cols:
            left, right = shape[1] - right, shape[1] - left
        if self.flip_rows:
            top, bottom = shape[0] - bottom, shape[0] - top
        return (left, right, top, bottom) if self.transpose else (top, bottom, left, right)


def canonical_transform(patient_orientation: Sequence[str] | None) -> OrientationTransform:
    """Transform to "patient right on image left, head at top".

    ``patient_orientation`` is the value of Patient Orientation (0020,0020):
    the first item is the patient direction of increasing column index (along
    a row), the second of increasing row index (PS3.3 C.7.6.1.1.1). A PA chest
    displayed conventionally is ``["L", "F"]``. Unknown or missing values keep
    that convention as the default (the image is not changed).
    """
    if not patient_orientation or len(patient_orientation) != 2:
        return OrientationTransform()
    row_dir, col_dir = (str(v).upper() for v in patient_orientation)

    def main_letter(value: str, letters: str) -> str | None:
        # Oblique values like "LA" or "FL" list the dominant direction first.
        for ch in value:
            if ch in letters:
                return ch
        return None

    lateral_on_rows = main_letter(row_dir, "LR")
    axial_on_cols = main_letter(col_dir, "HF")
    if lateral_on_rows and axial_on_cols:
        return OrientationTransform(
            transpose=False, flip_rows=axial_on_cols == "H", flip_cols=lateral_on_rows == "R"
        )
    # Rotated by 90 degrees: rows run head/feet, columns run left/right.
    axial_on_rows = main_letter(row_dir, "HF")
    lateral_on_cols = main_letter(col_dir, "LR")
    if axial_on_rows and lateral_on_cols:
        # After transposing, the old column direction runs along rows.
        return OrientationTransform(
            transpose=True, flip_rows=axial_on_rows == "H", flip_cols=lateral_on_cols == "R"
        )
    return OrientationTransform()


@dataclass(frozen=True)
class LungPair:
    """Binary masks of the patient's right and left lung (canonical orientation)."""

    right: np.ndarray
    left: np.ndarray
    lungs_found: int
    #: :func:`bounds` of right and left where already known (None: not yet computed)
    boxes: tuple[Box | None, Box | None] = (None, None)


def centroid_column(blob: np.ndarray, box: Box | None = None) -> float:
    """Mean column index of a non-empty mask (from column sums: no index grids), read inside ``box``
    (:func:`bounds`) when given."""
    top, bottom, left, right = box if box is not None else (0, blob.shape[0], 0, blob.shape[1])
    counts = np.count_nonzero(blob[top:bottom, left:right], axis=0)
    return float(counts @ np.arange(left, right)) / float(counts.sum())


def largest_components(mask: np.ndarray, count: int) -> list[np.ndarray]:
    """The ``count`` largest 8-connected components of ``mask``, largest first."""
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return []
    areas = np.bincount(labels.ravel())[1:]
    order = np.argsort(-areas, kind="stable")[:count]
    return [labels == (i + 1) for i in order]


def remove_small_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop components smaller than ``min_fraction`` of the image area."""
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return mask.astype(bool)
    areas = np.bincount(labels.ravel())
    keep = areas >= min_fraction * mask.size
    if keep[1:].all():  # nothing to drop (the usual case after an opening): skip the lookup over every pixel
        return mask.astype(bool)
    keep[0] = False
    return keep[labels]


#: A single blob is two touching lungs only where its column profile dips to
#: at most this fraction of the lower of the two peaks on either side.
WAIST_RATIO = 0.5


def _split_single_blob(blob: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Split one blob at a real waist between two touching lungs, else ``None``.

    The cut is the emptiest column of the blob's middle 40 %. It counts as a
    waist only when the column profile (lung pixels per column) rises again
    on both sides of it to at least ``1 / WAIST_RATIO`` times its height: a
    single lung, whose profile has one hump, is never cut in two.
    """
    profile = np.count_nonzero(blob, axis=0)
    cols = np.flatnonzero(profile)
    lo, hi = cols[0], cols[-1]
    width = hi - lo + 1
    if width < 10:
        return None
    start, stop = lo + int(0.3 * width), lo + int(0.7 * width) + 1
    cut = start + int(np.argmin(profile[start:stop]))
    lower_peak = min(int(profile[:cut].max(initial=0)), int(profile[cut + 1:].max(initial=0)))
    if lower_peak == 0 or profile[cut] > WAIST_RATIO * lower_peak:
        return None
    left_part = blob.copy()
    left_part[:, cut:] = False
    right_part = blob.copy()
    right_part[:, :cut] = False
    if not left_part.any() or not right_part.any():
        return None
    return left_part, right_part


def split_lungs(mask: np.ndarray, image_laterality: str | None = None,
                blobs: Sequence[np.ndarray] | None = None) -> LungPair:
    """Name the two largest blobs of a canonical-orientation mask right/left.

    ``blobs``: those two (or fewer) components already separated, e.g. at the
    model's resolution by the pipeline, so the full-resolution mask is not
    labelled again.

    The blob whose centroid is further to the image left is the patient's
    right lung. A single blob is cut in two only at a real waist (two
    touching lungs, :func:`_split_single_blob`); otherwise it is one lung,
    assigned by Image Laterality (0020,0062) "R"/"L" when given, else by
    which half of the image holds its centroid, and the other side is empty
    (its zones are reported unscored, never as clear).
    """
    mask = mask if mask.dtype == bool else mask.astype(bool)
    empty = np.zeros_like(mask)
    if blobs is None:
        blobs = largest_components(mask, 2)
    else:
        blobs = [b if b.dtype == bool else b.astype(bool) for b in blobs]
    boxes = [bounds(b) for b in blobs]
    blobs = [b for b, box in zip(blobs, boxes) if box != EMPTY_BOX][:2]
    boxes = [box for box in boxes if box != EMPTY_BOX][:2]
    found = len(blobs)
    if found == 0:
        return LungPair(empty, empty.copy(), 0, (EMPTY_BOX, EMPTY_BOX))
    if found == 1:
        blob = blobs[0]
        split = _split_single_blob(blob)
        if split is not None:
            return LungPair(split[0], split[1], 2)
        side = (image_laterality or "").upper()
        if side not in ("R", "L"):
            side = "R" if centroid_column(blob, boxes[0]) < mask.shape[1] / 2 else "L"
        if side == "R":
            return LungPair(blob, empty, 1, (boxes[0], EMPTY_BOX))
        return LungPair(empty, blob, 1, (EMPTY_BOX, boxes[0]))
    a, b = blobs
    if centroid_column(a, boxes[0]) <= centroid_column(b, boxes[1]):
        return LungPair(a, b, found, (boxes[0], boxes[1]))
    return LungPair(b, a, found, (boxes[1], boxes[0]))


def lung_zones(lung: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one lung (head at top) into upper, middle, lower zones of equal area.

    Pixels are ordered top to bottom, and left to right within a row; the
    first ``round(N/3)`` go to the upper zone, the next to the middle one.
    Zone areas therefore differ by at most one pixel, and each zone is a
    horizontal band except for the single row it shares with its neighbour.
    """
    insides, boxes = _lung_zones(lung if lung.dtype == bool else lung.astype(bool))
    upper, middle, lower = (whole_plane(inside, box, lung.shape) for inside, box in zip(insides, boxes))
    return upper, middle, lower


def _lung_zones(lung: np.ndarray, box: Box | None = None) -> tuple[list[np.ndarray], list[Box]]:
    """:func:`lung_zones` as each zone's box (:func:`bounds` or larger) and its pixels inside it.

    The cut rows come from the lung's pixel count per row; only the two
    boundary rows are split pixel by pixel. Each zone is copied from the lung
    inside its band: the lung's pixels are read about twice, not once per
    zone and pixel index, and no full-resolution plane is made.
    """
    box = bounds(lung) if box is None else box  # split_lungs has usually found it already
    if box == EMPTY_BOX:
        return [take_box(lung, EMPTY_BOX)] * 3, [EMPTY_BOX] * 3
    top, _, left, right = box
    inside = take_box(lung, box)
    ends = np.cumsum(np.count_nonzero(inside, axis=1))  # ends[r]: pixels in rows up to r
    n = int(ends[-1])
    c1, c2 = round(n / 3), round(2 * n / 3)
    bands, boxes = [], []
    for lo, hi in ((0, c1), (c1, c2), (c2, n)):
        if hi <= lo:
            bands.append(take_box(lung, EMPTY_BOX))
            boxes.append(EMPTY_BOX)
            continue
        first, last = (int(np.searchsorted(ends, k, side="right")) for k in (lo, hi - 1))  # rows of pixels lo, hi-1
        band = inside[first:last + 1].copy()
        for row in {first, last}:  # keep only the pixels of ranks lo..hi-1 in the boundary rows
            cols = np.flatnonzero(inside[row])
            ranks = (int(ends[row - 1]) if row else 0) + np.arange(cols.size)
            band[row - first, cols[(ranks < lo) | (ranks >= hi)]] = False
        bands.append(band)
        boxes.append((top + first, top + last + 1, left, right))
    return bands, boxes


#: T when neither the config nor the disease model gives one: the paper's default (Danilov et al. 2022).
DEFAULT_ZONE_THRESHOLD = 0.30
#: Brixia-style grade cut-offs, fractions of a zone: grade 0 up to the first, 1, 2 up to the next, 3 above.
DEFAULT_BRIXIA_CUTOFFS: tuple[float, float, float] = (0.05, 0.30, 0.60)


class ScoringConfig:
    """Thresholds of the scores; see docs/scoring.md for their meaning."""

    def __init__(
        self,
        zone_threshold: float = DEFAULT_ZONE_THRESHOLD,
        brixia_cutoffs: Sequence[float] = DEFAULT_BRIXIA_CUTOFFS,
    ) -> None:
        if not 0.0 <= zone_threshold <= 1.0:
            raise ValueError(f"zone_threshold must be a fraction in [0, 1], got {zone_threshold}")
        cut = tuple(float(c) for c in brixia_cutoffs)
        if len(cut) != 3 or list(cut) != sorted(cut) or not all(0.0 <= c <= 1.0 for c in cut):
            raise ValueError(f"brixia_cutoffs must be 3 increasing fractions, got {brixia_cutoffs}")
        self.zone_threshold = float(zone_threshold)
        self.brixia_cutoffs = cut


@dataclass
class ZoneScores:
    """All scores of one radiograph. Zone lists follow :data:`ZONE_NAMES`."""

    fractions: list[float]
    binary: list[int]
    brixia: list[int]
    total: int
    brixia_total: int
    extent_right: int
    extent_left: int
    zone_threshold: float
    lungs_found: int
    lung_area_px: int
    lesion_area_px: int
    lung_area_mm2: float | None = None
    lesion_area_mm2: float | None = None
    zone_area_px: list[int] = field(default_factory=list)

    @property
    def extent_total(self) -> int:
        return self.extent_right + self.extent_left

    @property
    def scored(self) -> list[bool]:
        """Per zone: was its lung found? A zone of a missing lung is unscored, not clear."""
        return [area > 0 for area in self.zone_area_px] if self.zone_area_px else [True] * len(ZONE_NAMES)

    @property
    def missing_lungs(self) -> list[str]:
        """"right" and/or "left" when that lung was not found."""
        scored = self.scored
        return [side for side, k in (("right", 0), ("left", 3)) if not scored[k]]

    def as_dict(self) -> dict[str, object]:
        zones = {
            name: {
                "brixia_zone": letter,
                "scored": ok,
                "affected_fraction": round(frac, 4) if ok else None,
                "binary_score": b if ok else None,
                "brixia_grade": g if ok else None,
                "area_px": a,
            }
            for name, letter, ok, frac, b, g, a in zip(
                ZONE_NAMES, BRIXIA_LETTERS, self.scored, self.fractions, self.binary, self.brixia, self.zone_area_px
            )
        }
        return {
            "total_score": self.total,
            "zones_scored": sum(self.scored),
            "missing_lungs": self.missing_lungs,
            "brixia_total": self.brixia_total,
            "geographic_extent": {
                "right": self.extent_right,
                "left": self.extent_left,
                "total": self.extent_total,
            },
            "zone_threshold": self.zone_threshold,
            "lungs_found": self.lungs_found,
            "lung_area_px": self.lung_area_px,
            "lesion_area_px": self.lesion_area_px,
            "lung_area_mm2": self.lung_area_mm2,
            "lesion_area_mm2": self.lesion_area_mm2,
            "zones": zones,
        }


def brixia_grade(fraction: float, cutoffs: Sequence[float]) -> int:
    """0 when ``fraction <= cutoffs[0]``; then 1, 2, 3 above each further cut-off."""
    return int(sum(fraction > c for c in cutoffs))


def extent_grade(fraction: float) -> int:
    """Geographic extent of one lung: 0 none, 1 <25 %, 2 25-50 %, 3 50-75 %, 4 >75 %."""
    if fraction <= 0.0:
        return 0
    return min(4, 1 + int(fraction // 0.25))


@dataclass(frozen=True)
class ZoneMasks:
    """The six zones in :data:`ZONE_NAMES` order and the two lungs, in the source orientation.

    Each zone is kept as a box holding all its pixels (:func:`bounds` or larger) and
    the zone inside it: a zone is a few percent of a film, and its full plane (5 MB
    of bool on a 2500 x 2048 CR, zeroed for each zone) is made only when
    :attr:`zones` is read (the overlay, JPEG 2000 frames, highdicom's reference SEG).
    Scoring and the SEG template read :attr:`insides` alone.
    """

    right: np.ndarray
    left: np.ndarray
    lungs_found: int
    boxes: tuple[Box, ...]
    #: Per zone, its pixels inside its box (``zones[k][box]``).
    insides: tuple[np.ndarray, ...]

    @classmethod
    def of_planes(cls, zones: Sequence[np.ndarray], right: np.ndarray, left: np.ndarray,
                  lungs_found: int) -> ZoneMasks:
        """From full-resolution zone planes (each then kept inside its :func:`bounds`)."""
        planes = [z if z.dtype == bool else z.astype(bool) for z in zones]
        boxes = tuple(bounds(z) for z in planes)
        return cls(right, left, lungs_found, boxes, tuple(take_box(z, b) for z, b in zip(planes, boxes)))

    @cached_property
    def zones(self) -> tuple[np.ndarray, ...]:
        """The six zones as full-resolution planes, made on first use."""
        return tuple(whole_plane(inside, box, self.right.shape) for box, inside in zip(self.boxes, self.insides))


def zone_masks(
    lung_mask: np.ndarray,
    patient_orientation: Sequence[str] | None = None,
    image_laterality: str | None = None,
    blobs: Sequence[np.ndarray] | None = None,
) -> ZoneMasks:
    """Split a lung mask (or its separated ``blobs``, :func:`split_lungs`) into the six zones, returned in
    the mask's own orientation."""
    transform = canonical_transform(patient_orientation)
    canonical_blobs = None if blobs is None else [transform.apply(b) for b in blobs]
    canonical = transform.apply(lung_mask)
    pair = split_lungs(canonical, image_laterality, canonical_blobs)
    right, right_boxes = _lung_zones(pair.right, pair.boxes[0])
    left, left_boxes = _lung_zones(pair.left, pair.boxes[1])
    shape = (canonical.shape[0], canonical.shape[1])
    return ZoneMasks(
        right=np.ascontiguousarray(transform.invert(pair.right)),
        left=np.ascontiguousarray(transform.invert(pair.left)),
        lungs_found=pair.lungs_found,
        boxes=tuple(transform.invert_box(b, shape) for b in right_boxes + left_boxes),
        # a band of the canonical image, inverted, is the inverted image's band in the inverted box
        insides=tuple(np.ascontiguousarray(transform.invert(z)) for z in right + left),
    )


def score_zones(
    zones: ZoneMasks,
    disease_mask: np.ndarray,
    config: ScoringConfig | None = None,
    pixel_spacing_mm: tuple[float, float] | None = None,
) -> ZoneScores:
    """Score the disease mask against precomputed zones."""
    config = config or ScoringConfig()
    disease = disease_mask if disease_mask.dtype == bool else disease_mask.astype(bool)
    zone_area = [int(np.count_nonzero(z)) for z in zones.insides]
    affected = [int(np.count_nonzero(z & take_box(disease, b))) for z, b in zip(zones.insides, zones.boxes)]
    fractions = [a / z if z else 0.0 for a, z in zip(affected, zone_area)]
    binary = [int(f > config.zone_threshold) for f in fractions]
    brixia = [brixia_grade(f, config.brixia_cutoffs) for f in fractions]

    def lung_fraction(idx: slice) -> float:
        area = sum(zone_area[idx])
        return sum(affected[idx]) / area if area else 0.0

    lung_px = sum(zone_area)
    lesion_px = sum(affected)
    pixel_mm2 = None
    if pixel_spacing_mm and all(s > 0 for s in pixel_spacing_mm):
        pixel_mm2 = float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    return ZoneScores(
        fractions=fractions,
        binary=binary,
        brixia=brixia,
        total=sum(binary),
        brixia_total=sum(brixia),
        extent_right=extent_grade(lung_fraction(slice(0, 3))),
        extent_left=extent_grade(lung_fraction(slice(3, 6))),
        zone_threshold=config.zone_threshold,
        lungs_found=zones.lungs_found,
        lung_area_px=lung_px,
        lesion_area_px=lesion_px,
        lung_area_mm2=lung_px * pixel_mm2 if pixel_mm2 else None,
        lesion_area_mm2=lesion_px * pixel_mm2 if pixel_mm2 else None,
        zone_area_px=zone_area,
    )


def score(
    lung_mask: np.ndarray,
    disease_mask: np.ndarray,
    config: ScoringConfig | None = None,
    patient_orientation: Sequence[str] | None = None,
    image_laterality: str | None = None,
    pixel_spacing_mm: tuple[float, float] | None = None,
    blobs: Sequence[np.ndarray] | None = None,
) -> tuple[ZoneScores, ZoneMasks]:
    """Zones and scores of one radiograph's lung and disease masks.

    The disease mask counts only inside the lungs that were kept: opacity
    outside the two lung components is ignored. ``blobs``: the lung mask's
    components, already separated (:func:`split_lungs`).
    """
    zones = zone_masks(lung_mask, patient_orientation, image_laterality, blobs)
    return score_zones(zones, disease_mask, config, pixel_spacing_mm), zones
