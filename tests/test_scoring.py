"""Zone algorithm and scores, on generated masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrtriage.inference.scoring import (
    ScoringConfig,
    brixia_grade,
    canonical_transform,
    extent_grade,
    lung_zones,
    score,
    split_lungs,
    zone_masks,
)


@st.composite
def blob_masks(draw: st.DrawFn, min_side: int = 8, max_side: int = 60) -> np.ndarray:
    """A random boolean mask: a filled polygon-ish blob plus random pixels."""
    h = draw(st.integers(min_side, max_side))
    w = draw(st.integers(min_side, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(2, h), rng.uniform(2, w)
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    mask |= rng.random((h, w)) < draw(st.floats(0.0, 0.3))
    return mask


def two_lung_mask(h: int = 60, w: int = 80, right_width: int = 20, left_width: int = 12) -> np.ndarray:
    """Image-left blob wider than the image-right one, so sides are recognisable."""
    mask = np.zeros((h, w), dtype=bool)
    mask[10:50, 5 : 5 + right_width] = True
    mask[12:48, w - 5 - left_width : w - 5] = True
    return mask


@given(blob_masks())
@settings(max_examples=200, deadline=None)
def test_zones_have_equal_area_to_within_one_pixel(mask: np.ndarray) -> None:
    zones = lung_zones(mask)
    areas = [int(z.sum()) for z in zones]
    n = int(mask.sum())
    assert sum(areas) == n
    assert max(areas) - min(areas) <= 1
    # The zones partition the lung: disjoint and covering it.
    union = zones[0] | zones[1] | zones[2]
    assert np.array_equal(union, mask)
    assert not (zones[0] & zones[1]).any() and not (zones[1] & zones[2]).any()


@given(blob_masks(min_side=12))
@settings(max_examples=100, deadline=None)
def test_upper_zone_lies_above_lower_zone(mask: np.ndarray) -> None:
    upper, middle, lower = lung_zones(mask)
    rows = [np.flatnonzero(z.any(axis=1)) for z in (upper, middle, lower)]
    for above, below in zip(rows, rows[1:]):
        if above.size and below.size:
            # Zones may share only the one row where the cut falls.
            assert above.max() <= below.min()


@pytest.mark.parametrize(
    ("orientation", "flip_cols", "flip_rows"),
    [
        (None, False, False),
        (["L", "F"], False, False),
        (["R", "F"], True, False),
        (["L", "H"], False, True),
        (["R", "H"], True, True),
    ],
)
def test_left_right_follow_patient_orientation(orientation, flip_cols: bool, flip_rows: bool) -> None:
    canonical = two_lung_mask()
    image = canonical[:, ::-1] if flip_cols else canonical
    image = image[::-1, :] if flip_rows else image
    zones = zone_masks(image, orientation)
    # The patient's right lung is the wider one whatever the display.
    right_width = np.flatnonzero(zones.right.any(axis=0)).size
    left_width = np.flatnonzero(zones.left.any(axis=0)).size
    assert (right_width, left_width) == (20, 12)
    # The upper zone is towards the head: in an H-down image, the bottom rows.
    right_upper_rows = np.flatnonzero(zones.zones[0].any(axis=1))
    right_lower_rows = np.flatnonzero(zones.zones[2].any(axis=1))
    if flip_rows:
        assert right_upper_rows.min() > right_lower_rows.max() - 1
    else:
        assert right_upper_rows.max() < right_lower_rows.min() + 1


def test_rotated_orientation_is_transposed() -> None:
    canonical = two_lung_mask()
    rotated = canonical.T  # rows now run left-right: orientation (F, L)
    zones = zone_masks(rotated, ["F", "L"])
    assert np.flatnonzero(zones.right.any(axis=1)).size == 20
    t = canonical_transform(["F", "L"])
    assert t.transpose and np.array_equal(t.invert(t.apply(rotated)), rotated)


@given(st.sampled_from(["LF", "RF", "LH", "RH", "FL", "FR", "HL", "HR"]), blob_masks())
@settings(max_examples=60, deadline=None)
def test_orientation_transform_round_trips(orientation: str, mask: np.ndarray) -> None:
    t = canonical_transform(list(orientation))
    assert np.array_equal(t.invert(t.apply(mask)), mask)


def test_two_largest_of_three_blobs_are_kept() -> None:
    mask = two_lung_mask()
    mask[2:6, 38:42] = True  # a small third blob between the lungs, first in raster order
    pair = split_lungs(mask)
    assert pair.lungs_found == 2
    assert not pair.right[2:6, 38:42].any() and not pair.left[2:6, 38:42].any()
    assert pair.right.sum() == 40 * 20 and pair.left.sum() == 36 * 12


def test_lungs_do_not_leak_into_each_other() -> None:
    # An L-shaped lung whose bounding box overlaps the other lung: the
    # published bounding-box crop would take pixels of both.
    mask = np.zeros((50, 60), dtype=bool)
    mask[5:45, 5:15] = True
    mask[40:45, 5:40] = True
    mask[5:35, 30:50] = True
    pair = split_lungs(mask)
    assert not (pair.right & pair.left).any()
    assert pair.right.sum() + pair.left.sum() == mask.sum()


def test_single_blob_across_midline_is_split() -> None:
    mask = two_lung_mask()
    mask[30:32, 20:70] = True  # a bridge joining the lungs
    pair = split_lungs(mask)
    assert pair.right.any() and pair.left.any()
    assert ndcentre(pair.right) < ndcentre(pair.left)


def ndcentre(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def test_single_blob_uses_image_laterality() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 25:35] = True
    assert split_lungs(mask, "R").right.any()
    assert split_lungs(mask, "L").left.any()
    assert split_lungs(mask).left.any()  # image right half, no laterality: patient left


def test_scores_count_zones_above_threshold() -> None:
    lungs = two_lung_mask()
    zones = zone_masks(lungs)
    disease = zones.zones[0].copy()  # right upper fully affected
    disease |= zones.zones[5] & (np.arange(lungs.shape[0])[:, None] % 4 == 0)  # left lower, ~25 %
    scores, _ = score(lungs, disease, ScoringConfig(zone_threshold=0.3), pixel_spacing_mm=(0.5, 0.5))
    assert scores.binary == [1, 0, 0, 0, 0, 0]
    assert scores.total == 1
    assert scores.fractions[0] == pytest.approx(1.0)
    assert 0.15 < scores.fractions[5] < 0.35
    assert scores.brixia[0] == 3 and scores.brixia[5] == 1
    assert scores.extent_right == 2  # a third of the right lung
    assert scores.lung_area_mm2 == pytest.approx(lungs.sum() * 0.25)
    assert scores.lesion_area_mm2 == pytest.approx(disease.sum() * 0.25)


def test_disease_outside_lungs_is_ignored() -> None:
    lungs = two_lung_mask()
    disease = ~lungs
    scores, _ = score(lungs, disease)
    assert scores.total == 0 and scores.lesion_area_px == 0


def test_empty_lung_mask_scores_zero() -> None:
    empty = np.zeros((30, 30), dtype=bool)
    scores, zones = score(empty, empty)
    assert scores.lungs_found == 0 and scores.total == 0 and scores.lung_area_mm2 is None


def test_grades() -> None:
    cut = (0.05, 0.3, 0.6)
    assert [brixia_grade(f, cut) for f in (0.0, 0.05, 0.06, 0.3, 0.31, 0.61, 1.0)] == [0, 0, 1, 1, 2, 3, 3]
    assert [extent_grade(f) for f in (0.0, 0.01, 0.25, 0.5, 0.74, 0.76, 1.0)] == [0, 1, 2, 3, 3, 4, 4]


def test_bad_scoring_config_is_refused() -> None:
    with pytest.raises(ValueError, match="zone_threshold"):
        ScoringConfig(zone_threshold=30)
    with pytest.raises(ValueError, match="brixia_cutoffs"):
        ScoringConfig(brixia_cutoffs=(0.5, 0.1, 0.9))


# -- one lung found (issue #9 item 3) ------------------------------------------


def test_one_lung_across_the_centre_is_one_lung() -> None:
    # The example: one lung whose blob crosses the centre column has no
    # waist and must not be cut into a "right" and a "left" lung.
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:91, 30:56] = True
    pair = split_lungs(mask)
    assert pair.lungs_found == 1
    assert pair.right.sum() == mask.sum() and not pair.left.any()  # centroid on the image left: patient right


def test_one_lung_scores_its_own_zones_and_flags_the_other_unscored() -> None:
    lungs = np.zeros((100, 100), dtype=bool)
    lungs[20:91, 30:56] = True
    disease = lungs & (np.arange(100)[:, None] < 44)  # the upper third of that lung
    scores, zones = score(lungs, disease)
    assert scores.lungs_found == 1
    assert scores.scored == [True, True, True, False, False, False]
    assert scores.missing_lungs == ["left"]
    assert scores.binary[:3] == [1, 0, 0] and scores.total == 1  # the opacity scores the right upper zone only
    assert not any(z.any() for z in zones.zones[3:])
    record = scores.as_dict()
    assert record["zones_scored"] == 3 and record["missing_lungs"] == ["left"]
    left = [record["zones"][name] for name in ("left_upper", "left_middle", "left_lower")]
    assert all(z["scored"] is False and z["binary_score"] is None and z["brixia_grade"] is None for z in left)
    assert record["zones"]["right_upper"]["binary_score"] == 1


def test_no_lung_leaves_every_zone_unscored() -> None:
    empty = np.zeros((30, 30), dtype=bool)
    record = score(empty, empty)[0].as_dict()
    assert record["zones_scored"] == 0 and record["missing_lungs"] == ["right", "left"]


@st.composite
def single_lungs(draw: st.DrawFn) -> np.ndarray:
    """One lung-like blob (an ellipse, optionally with a costophrenic notch) anywhere across the image."""
    mask = np.zeros((120, 120), dtype=bool)
    rows, cols = np.ogrid[:120, :120]
    cy, cx = draw(st.integers(45, 75)), draw(st.integers(35, 85))
    ry, rx = draw(st.integers(25, 40)), draw(st.integers(10, 30))
    mask |= ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
    if draw(st.booleans()):  # a flat, diaphragm-like base
        mask[cy + ry // 2:, :] = False
    return mask


@given(single_lungs())
@settings(max_examples=80, deadline=None)
def test_a_single_lung_is_never_cut_in_two(mask: np.ndarray) -> None:
    pair = split_lungs(mask)
    assert pair.lungs_found == 1
    assert (pair.right | pair.left).sum() == mask.sum() and not (pair.right.any() and pair.left.any())


@given(st.integers(1, 6), st.integers(0, 40))
@settings(max_examples=40, deadline=None)
def test_touching_lungs_are_cut_at_their_waist(bridge_rows: int, bridge_top: int) -> None:
    mask = two_lung_mask()
    mask[bridge_top:bridge_top + bridge_rows, 20:70] |= True  # the lungs touch across the mediastinum
    pair = split_lungs(mask)
    assert pair.lungs_found == 2
    assert pair.right.any() and pair.left.any() and ndcentre(pair.right) < ndcentre(pair.left)
