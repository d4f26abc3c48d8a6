"""Held-out quality of the bundled models on 200 synthetic radiographs (issue #2 goals)."""

from __future__ import annotations

import numpy as np
import pytest

from cxrtriage.inference.training.evaluation import evaluate_synthetic

pytestmark = pytest.mark.slow


def test_bundled_models_meet_the_goals_on_held_out_phantoms(pipeline) -> None:
    result = evaluate_synthetic(pipeline, images=200)
    assert result.lung_dice >= 0.95
    assert result.score_mae <= 0.5
    assert result.auc >= 0.95
    # The held-out set has both normal and diseased cases, and real errors would show.
    assert 0 < sum(r["truth"] == 0 for r in result.per_image) < 200


#: RG1_UNCR.dcm (pydicom-data, 1955 x 1841, MONOCHROME1, patient's right on the image left),
#: read by eye on an equalised rendering of the image (rows counted from the top):
#: the right hemidiaphragm dome is at about row 1420 and the right costophrenic angle,
#: the lowest point of that lung, at about row 1475; the left dome at about row 1490 and
#: the left costophrenic angle at about row 1525. Lung pixels may reach the angles, not below.
RG1_LOWEST_LUNG_ROW = {"right": 1475, "left": 1525}
#: Slack for reading by eye and for the 256-pixel model's resolution (about 7.6 source rows
#: per model pixel): 50 rows, 2.6 % of the image height.
RG1_ROW_TOLERANCE = 50


@pytest.mark.xfail(
    strict=True,
    reason="the bundled models (phantoms + DRRs of one CT, docs/model-card.md) still draw lung below the right "
    "hemidiaphragm on RG1: lowest rows 1538 (right) and 1570 (left), limits 1525 and 1575",
)
def test_bundled_lungs_stop_at_the_diaphragm_on_real_rg1(pipeline, rg1) -> None:
    """Two lungs on the real CR, and no lung mask below either hemidiaphragm.

    RG1 is for evaluation only: nothing was trained, tuned or selected on it.
    The test is strict-xfail while the bundled models miss the goal, so that a
    model that meets it turns the suite red until the marker is removed.
    """
    from cxrtriage.inference.radiograph import load_dicom

    result = pipeline(load_dicom(rg1))
    assert result.zones.lungs_found == 2
    h, w = result.lungs.shape
    for side, mask in (("right", result.zones.right), ("left", result.zones.left)):
        rows = np.flatnonzero(mask.any(axis=1))
        assert rows.size, f"no {side} lung"
        assert rows[-1] <= RG1_LOWEST_LUNG_ROW[side] + RG1_ROW_TOLERANCE, f"{side} lung runs below the diaphragm"
    # The patient's right lung is on the image left (Patient Orientation L\F).
    cols_right = np.flatnonzero(result.zones.right.any(axis=0))
    cols_left = np.flatnonzero(result.zones.left.any(axis=0))
    assert cols_right.mean() < w / 2 < cols_left.mean()
