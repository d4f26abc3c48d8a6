"""Held-out quality of the bundled models on 200 synthetic radiographs (issue #2 goals)."""

from __future__ import annotations

import pytest

from cxrtriage.inference.evaluation import evaluate_synthetic

pytestmark = pytest.mark.slow


def test_bundled_models_meet_the_goals_on_held_out_phantoms(pipeline) -> None:
    result = evaluate_synthetic(pipeline, images=200)
    assert result.lung_dice >= 0.95
    assert result.score_mae <= 0.5
    assert result.auc >= 0.95
    # The held-out set has both normal and diseased cases, and real errors would show.
    assert 0 < sum(r["truth"] == 0 for r in result.per_image) < 200
