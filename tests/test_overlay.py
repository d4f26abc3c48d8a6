"""The overlay PNG says which models made it, and carries the research-use notice when it applies."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cxrtriage.inference.identity import ModelIdentity
from cxrtriage.inference.overlay import NOTICE_COLOUR, render_overlay
from cxrtriage.inference.radiograph import load_radiograph


def amber_rows(canvas: np.ndarray) -> np.ndarray:
    """Rows where most pixels are the notice's amber."""
    return np.flatnonzero((canvas == np.array(NOTICE_COLOUR, dtype=np.uint8)).all(axis=2).mean(axis=1) > 0.5)


def test_overlay_carries_the_research_notice_for_models_not_trained_on_real_films(pipeline, phantom_cr) -> None:
    r = load_radiograph(phantom_cr)
    result = pipeline(r)
    assert result.identity.research_use
    canvas = render_overlay(r.pixels, result)
    rows = amber_rows(canvas)
    assert rows.size > 0 and rows.min() > 0.8 * canvas.shape[0]  # a footer band at the bottom

    real = ModelIdentity(*(replace(m, origin="published", training_data=("real",))
                           for m in (result.identity.lungs, result.identity.disease)))
    assert amber_rows(render_overlay(r.pixels, replace(result, identity=real))).size == 0
