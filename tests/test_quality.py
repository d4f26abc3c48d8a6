"""Held-out quality of the bundled models on 200 synthetic radiographs (issue #2 goals)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrtriage.inference.training.evaluation import Evaluation

pytestmark = pytest.mark.slow

#: The first, phantom-only bundle's 0-6 MAE on these 200 phantoms (docs/model-card.md, "Phantoms").
PHANTOM_ONLY_MAE = 0.025


def test_bundled_models_meet_the_goals_on_held_out_phantoms(held_out_evaluation: Evaluation) -> None:
    result = held_out_evaluation
    assert result.lung_dice >= 0.95
    assert result.score_mae <= 0.5
    # issue #10: no more than 0.1 above the phantom-only bundle's 0.025 (disease round 13: 0.120, docs/model-card.md)
    assert result.score_mae <= PHANTOM_ONLY_MAE + 0.1, result.score_mae
    assert result.auc >= 0.95
    # The held-out set has both normal and diseased cases, and real errors would show.
    assert 0 < sum(r["truth"] == 0 for r in result.per_image) < 200


#: RG1_UNCR.dcm (pydicom-data, 1955 x 1841, MONOCHROME1, patient's right on the image left): both
#: hemidiaphragm domes, one row per column from the lateral chest wall to the cardiophrenic angle,
#: traced from the image alone by ``bench/rg1_diaphragm.py`` (no model; the traced path is drawn in
#: docs/model-card-rg1-diaphragm.jpg). It replaces two rows read by eye on a whole-film view (lowest
#: lung points 1475 right, 1525 left), which enlarged crops showed to be about 80 rows too high:
#: the lateral costophrenic sulci end at rows 1555 (right) and 1602 (left).
RG1_DIAPHRAGM = json.loads((Path(__file__).with_name("rg1_diaphragm.json")).read_text())
#: Slack for the 256-pixel model's resolution (about 7.6 source rows per model pixel) and for the
#: trace: 50 rows, 2.6 % of the image height, as with the by-eye fixture.
RG1_ROW_TOLERANCE = 50


def rows_below_dome(mask: np.ndarray, side: str) -> tuple[int, int]:
    """(most rows, at which column) that ``mask``'s lowest pixel lies below the traced dome in any column."""
    dome = RG1_DIAPHRAGM["domes"][side]
    first, rows = dome["first_column"], np.asarray(dome["rows"])
    band = mask[:, first : first + rows.size]
    has = band.any(axis=0)
    lowest = band.shape[0] - 1 - np.argmax(band[::-1], axis=0)
    excess = np.where(has, lowest - rows, np.iinfo(np.int64).min)
    worst = int(np.argmax(excess))
    return int(excess[worst]), first + worst


def test_rg1_diaphragm_fixture_is_what_the_tracer_measures() -> None:
    """The fixture is the script's output, not a hand edit: re-trace and compare."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import rg1_diaphragm
    finally:
        sys.path.pop(0)
    image = rg1_diaphragm.rg1_pixels()
    for side, box in rg1_diaphragm.SEARCH.items():
        assert RG1_DIAPHRAGM["domes"][side]["rows"] == rg1_diaphragm.trace(image, *box).tolist()
    # The domes sit where anatomy puts them: the right higher, each sulcus well below its dome.
    assert RG1_DIAPHRAGM["dome_top"]["right"] < RG1_DIAPHRAGM["dome_top"]["left"]
    for side in ("right", "left"):
        assert RG1_DIAPHRAGM["lowest_row"][side] - RG1_DIAPHRAGM["dome_top"][side] > 100


def test_bundled_lungs_stop_at_the_diaphragm_on_real_rg1(pipeline, rg1) -> None:
    """Two lungs on the real CR, and no lung mask below either hemidiaphragm.

    Checked in every column of the traced domes, and for the lowest lung row
    anywhere against the sulcus. RG1 is for evaluation only: nothing was
    trained, tuned or selected on it. Lungs round 10 (docs/model-card.md) is
    the first bundled model to pass, with nothing to spare on the left dome
    (50 rows at column 1513, where the upsampled probability of the next row is
    0.49); round 9 missed by two rows.
    """
    from cxrtriage.inference.radiograph import load_dicom

    result = pipeline(load_dicom(rg1))
    assert result.zones.lungs_found == 2
    h, w = result.lungs.shape
    for side, mask in (("right", result.zones.right), ("left", result.zones.left)):
        rows = np.flatnonzero(mask.any(axis=1))
        assert rows.size, f"no {side} lung"
        assert rows[-1] <= RG1_DIAPHRAGM["lowest_row"][side] + RG1_ROW_TOLERANCE, f"{side} lung runs below its sulcus"
        excess, column = rows_below_dome(mask, side)
        assert excess <= RG1_ROW_TOLERANCE, f"{side} lung runs {excess} rows below the dome at column {column}"
    # The patient's right lung is on the image left (Patient Orientation L\F).
    cols_right = np.flatnonzero(result.zones.right.any(axis=0))
    cols_left = np.flatnonzero(result.zones.left.any(axis=0))
    assert cols_right.mean() < w / 2 < cols_left.mean()
