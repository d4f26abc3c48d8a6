"""The CPU-lean paths around the networks give exactly what their plain definitions give.

Each fast path (histograms and lookups in the decoder, block-wise conversion,
OpenCV's equalisation table rebuilt as one float lookup, copy-under-mask,
equal-area zones cut from row counts and scored inside their boxes) is
compared, bit for bit, with the straightforward formula it replaces, on
random images and masks of many shapes (including the degenerate ones).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cxrtriage.inference.preprocess import (
    CropBox,
    equalize,
    equalized_table,
    masked_lung_crop,
    normalise,
    resize,
    to_u8,
)
from cxrtriage.inference.radiograph import _histogram, lookup
from cxrtriage.inference.scoring import (
    ZONE_NAMES,
    ScoringConfig,
    ZoneMasks,
    bounds,
    canonical_transform,
    lung_zones,
    remove_small_components,
    score,
    score_zones,
    zone_masks,
)

RNG = np.random.default_rng(20_261_126)
ORIENTATIONS = [None, ["L", "F"], ["R", "F"], ["L", "H"], ["R", "H"], ["F", "L"], ["H", "R"], ["F", "R"], ["H", "L"]]


def blobs_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Up to three filled ellipses, sometimes with speckle: lung-like and not."""
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(1, w // 3 + 2)), int(rng.integers(1, h // 2 + 2)))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
    if rng.random() < 0.3:
        mask |= (rng.random((h, w)) < 0.05).astype(np.uint8)
    return mask.astype(bool)


def raster_zones(lung: np.ndarray) -> list[np.ndarray]:
    """docs/scoring.md's definition: the first round(N/3) pixels in raster order, the next, the rest."""
    flat = np.flatnonzero(lung.ravel())
    n = flat.size
    cuts = (0, round(n / 3), round(2 * n / 3), n)
    zones = []
    for lo, hi in zip(cuts, cuts[1:]):
        zone = np.zeros(lung.size, bool)
        zone[flat[lo:hi]] = True
        zones.append(zone.reshape(lung.shape))
    return zones


def test_zones_are_the_raster_order_thirds() -> None:
    for _ in range(150):
        h, w = (int(v) for v in RNG.integers(1, 120, 2))
        lung = blobs_mask(h, w, RNG)
        for fast, reference in zip(lung_zones(lung), raster_zones(lung)):
            np.testing.assert_array_equal(fast, reference)
    single_row = np.zeros((5, 9), bool)
    single_row[2, 1:8] = True  # every zone on one row: both cuts split it
    for fast, reference in zip(lung_zones(single_row), raster_zones(single_row)):
        np.testing.assert_array_equal(fast, reference)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_zone_boxes_hold_their_zones_and_scoring_inside_them_changes_nothing(orientation: list[str] | None) -> None:
    config = ScoringConfig()
    for _ in range(12):
        h, w = (int(v) for v in RNG.integers(20, 160, 2))
        lung, disease = blobs_mask(h, w, RNG), RNG.random((h, w)) < RNG.random()
        zones = zone_masks(lung, orientation)
        assert zones.boxes is not None and len(zones.boxes) == len(ZONE_NAMES)
        for zone, (top, bottom, left, right) in zip(zones.zones, zones.boxes):
            assert np.count_nonzero(zone[top:bottom, left:right]) == np.count_nonzero(zone)
        box = (0, h, 0, w)  # each zone scored over the whole image
        whole = ZoneMasks(zones.right, zones.left, zones.lungs_found, (box,) * 6, tuple(zones.zones))
        assert vars(score_zones(zones, disease, config)) == vars(score_zones(whole, disease, config))
        # The zones themselves are the raster-order thirds of each lung in the canonical orientation.
        transform = canonical_transform(orientation)
        for side, first in ((zones.right, 0), (zones.left, 3)):
            for k, reference in enumerate(raster_zones(transform.apply(side))):
                np.testing.assert_array_equal(transform.apply(zones.zones[first + k]), reference)


def test_bounds_is_the_smallest_box() -> None:
    assert bounds(np.zeros((4, 6), bool)) == (0, 0, 0, 0)
    mask = np.zeros((10, 12), bool)
    mask[3, 7] = mask[6, 2] = True
    assert bounds(mask) == (3, 7, 2, 8)


def test_scores_with_precomputed_blobs_equal_scores_without() -> None:
    from cxrtriage.inference.scoring import largest_components

    for k in range(30):  # display orientation: labelled in the same raster order, so ties break alike
        h, w = (int(v) for v in RNG.integers(30, 150, 2))
        lung, disease = blobs_mask(h, w, RNG), RNG.random((h, w)) < 0.4
        orientation = [None, ["L", "F"]][k % 2]
        with_blobs, _ = score(lung, disease, None, orientation, None, (0.2, 0.2), largest_components(lung, 2))
        without, _ = score(lung, disease, None, orientation, None, (0.2, 0.2))
        assert vars(with_blobs) == vars(without)


def reference_equalize(image: np.ndarray) -> np.ndarray:
    as_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.equalizeHist(as_u8).astype(np.float32) / 255.0


def test_equalize_is_opencvs_equalisation_of_the_rounded_image() -> None:
    for k in range(200):
        h, w = (int(v) for v in RNG.integers(1, 200, 2))
        kind = k % 5
        if kind == 0:
            image = RNG.random((h, w))
        elif kind == 1:
            image = RNG.beta(0.3, 5, (h, w))  # most pixels dark: long runs of empty levels
        elif kind == 2:
            image = np.full((h, w), RNG.random())  # one level: OpenCV fills the image with it
        elif kind == 3:
            image = RNG.choice(RNG.random(int(RNG.integers(1, 5))), (h, w))
        else:
            image = RNG.normal(0.5, 0.4, (h, w))  # outside [0, 1]: the clipped path
        image = image.astype(np.float32 if k % 3 else np.float64)
        fast = equalize(image)
        assert fast.dtype == np.float32
        np.testing.assert_array_equal(fast, reference_equalize(image))
        np.testing.assert_array_equal(to_u8(image), np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))


def test_normalise_crop_and_mask_resize_equal_their_formulas() -> None:
    for _ in range(20):
        h, w = (int(v) for v in RNG.integers(8, 300, 2))
        image = RNG.random((h, w)).astype(np.float32)
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        stack = np.repeat(image[None], 3, axis=0)
        expected = (stack - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
        np.testing.assert_array_equal(normalise(image, mean, std), expected)
        mask = RNG.random((h, w)) < 0.5
        box = CropBox(int(RNG.integers(0, h // 2)), h, 0, int(RNG.integers(w // 2 + 1, w + 1)))
        crop = masked_lung_crop(image, mask, box)
        assert crop.dtype == np.float32
        np.testing.assert_array_equal(crop, box.take(np.where(mask, image, 0.0).astype(np.float32)))
        for size in ((max(1, h // 3), max(1, w // 3)), (h * 2, w + 7)):
            for nearest in (False, True):
                plain = cv2.resize(mask.astype(np.uint8), size[::-1],
                                   interpolation=cv2.INTER_NEAREST if nearest else
                                   cv2.INTER_AREA if size[0] < h and size[1] < w else cv2.INTER_LINEAR)
                np.testing.assert_array_equal(resize(mask, size, nearest=nearest), plain.astype(bool))


@pytest.mark.parametrize("dtype,top", [(np.uint8, 255), (np.uint16, 4095), (np.uint16, 65535)])
def test_histogram_and_lookup_equal_bincount_and_take(dtype: type, top: int) -> None:
    codes: np.ndarray = RNG.integers(0, top + 1, (333, 97)).astype(dtype)
    np.testing.assert_array_equal(_histogram(codes), np.bincount(codes.ravel()))
    signed = RNG.integers(0, 300, (70, 40)).astype(np.int32)  # the decoder's offset signed codes
    np.testing.assert_array_equal(_histogram(signed), np.bincount(signed.ravel()))
    table = RNG.random(int(codes.max()) + 1).astype(np.float32)
    np.testing.assert_array_equal(lookup(table, codes), table[codes])


def two_lung_probabilities(size: int, rng: np.random.Generator) -> np.ndarray:
    """A Stage I-like output: two soft ellipses (side by side, stacked or overlapping) over faint noise."""
    prob = rng.random((size, size), dtype=np.float32) * np.float32(0.3)
    for _ in range(2):
        canvas = np.zeros((size, size), np.float32)
        centre = (int(rng.integers(size // 8, size - size // 8)), int(rng.integers(size // 8, size - size // 8)))
        axes = (int(rng.integers(size // 16, size // 4)), int(rng.integers(size // 16, size // 3)))
        cv2.ellipse(canvas, centre, axes, 0, 0, 360, float(rng.uniform(0.6, 1.0)), -1)
        prob = np.maximum(prob, cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.5, 3.0))))
    return prob


def test_lung_masks_single_upsample_equals_one_upsample_per_blob() -> None:
    """The union and the blobs of :func:`lung_masks` (one upsample, cut along the gap) are
    masks of one upsample per blob and their union, bit for bit; the cut is taken often."""
    from cxrtriage.inference.pipeline import _blob_cut, lung_masks, model_blobs

    cuts = 0
    for case in range(60):
        size = int(RNG.choice([64, 256]))
        prob = two_lung_probabilities(size, RNG)
        shape = (int(RNG.integers(2 * size, 10 * size)), int(RNG.integers(size // 2, 10 * size)))
        if case % 10 == 0:
            shape = (2 * size, 2 * size)  # the smallest enlargement the cut allows
        expected = [resize(blob, shape) > 0.5 for blob in model_blobs(prob, 0.5, 0.01)]
        full, kept = lung_masks(prob, 0.5, 0.01, shape)
        blobs = model_blobs(prob, 0.5, 0.01)
        cuts += len(blobs) == 2 and _blob_cut(blobs, prob.shape, shape) is not None
        assert len(kept) == len(expected)
        for got, want in zip(kept, expected):
            assert got.dtype == bool and np.array_equal(got, want)
        union = np.logical_or.reduce(expected) if expected else np.zeros(shape, bool)
        assert np.array_equal(full, union)
    assert cuts >= 15


def test_disease_mask_equals_paste_then_and() -> None:
    """The disease mask thresholded and ANDed inside the box only is the pasted full-size mask ANDed with the lungs."""
    from cxrtriage.inference.pipeline import disease_mask
    from cxrtriage.inference.preprocess import lung_box

    non_empty = 0
    for _ in range(30):
        h, w = int(RNG.integers(64, 400)), int(RNG.integers(64, 400))
        lungs = blobs_mask(h, w, RNG)
        box = lung_box(lungs, float(RNG.uniform(0.0, 0.05)))
        seg = two_lung_probabilities(int(RNG.choice([32, 64])), RNG)
        p = float(RNG.random())
        expected = box.paste(resize(seg * float(p >= 0.5), box.shape) > 0.5, (h, w)) & lungs
        got = disease_mask(seg, p, 0.5, box, lungs)
        assert got.dtype == bool and np.array_equal(got, expected)
        non_empty += bool(expected.any())
    assert non_empty >= 5


@pytest.mark.parametrize("top", [1, 255, 4095, 65535])
def test_equalized_table_equals_equalizing_the_looked_up_image(top: int) -> None:
    """Equalising through the stored values (a table and their counts) gives :func:`equalize` of the image,
    bit for bit: values on the 8-bit rounding boundaries, codes that never occur, one grey level."""
    for case in range(6):
        codes = RNG.integers(0, top + 1, (int(RNG.integers(1, 300)), int(RNG.integers(1, 300)))).astype(np.uint16)
        if case == 0:
            codes[:] = codes.flat[0]  # one grey level
        table = RNG.random(top + 1).astype(np.float32)
        boundary = (RNG.integers(0, 255, top + 1) + np.float32(0.5)) / np.float32(255)
        table = np.where(RNG.random(top + 1) < 0.3, boundary.astype(np.float32), table)
        table[RNG.random(top + 1) < 0.05] = 1.0
        counts = np.bincount(codes.ravel(), minlength=top + 1)
        got = lookup(equalized_table(table, counts), codes)
        np.testing.assert_array_equal(got, equalize(lookup(table, codes)))


@pytest.mark.parametrize("min_fraction", [0.0, 0.001, 0.01, 0.2, 1.0])
def test_remove_small_components_equals_the_lookup_of_kept_labels(min_fraction: float) -> None:
    """With nothing to drop the mask comes back as it was, without the per-pixel lookup; either way the result
    is the kept components' pixels."""
    from scipy import ndimage

    for shape, density in (((64, 64), 0.5), ((97, 131), 0.2), ((256, 256), 0.05), ((8, 8), 0.0), ((40, 40), 1.0)):
        mask = RNG.random(shape) < density
        mask[shape[0] // 4: shape[0] // 2, shape[1] // 4: shape[1] // 2] = density > 0  # one large blob
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        keep = areas >= min_fraction * mask.size
        keep[0] = False
        got = remove_small_components(mask.astype(np.uint8), min_fraction)
        assert got.dtype == bool
        np.testing.assert_array_equal(got, keep[labels])
