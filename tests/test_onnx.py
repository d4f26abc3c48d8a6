"""The ONNX Runtime backend gives the same results as eager torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrtriage.config import InferenceSettings
from cxrtriage.inference.phantom import PhantomGenerator
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.radiograph import Radiograph
from cxrtriage.inference.training.metrics import dice

pytestmark = pytest.mark.slow


def test_onnx_and_torch_give_the_same_scores(pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRTRIAGE_CACHE", str(tmp_path))
    onnx = Pipeline(InferenceSettings(backend="onnx"))
    assert list((tmp_path / "onnx").glob("*.onnx"))  # exported once, cached
    generator = PhantomGenerator(512, 480)
    same_total = 0
    for seed in range(6_000_000, 6_000_030):
        phantom = generator(seed)
        image = Radiograph(pixels=phantom.image, source=str(seed))
        a, b = pipeline(image), onnx(image)
        assert abs(a.p_disease - b.p_disease) < 1e-3
        assert dice(a.lungs, b.lungs) > 0.999
        same_total += a.scores.total == b.scores.total
        assert np.abs(np.array(a.scores.fractions) - np.array(b.scores.fractions)).max() < 0.01
    assert same_total == 30
    again = Pipeline(InferenceSettings(backend="onnx"))  # loads the cached export
    assert again.model_versions == onnx.model_versions
