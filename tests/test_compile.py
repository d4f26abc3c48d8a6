"""``inference.compile`` on the CPU: inductor's compiled models score as the eager ones, and a compile that
fails leaves a working, uncompiled predictor and says why."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cxrtriage.config import InferenceSettings
from cxrtriage.inference.models import ModelSpec
from cxrtriage.inference.phantom import PhantomGenerator
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.predictors import TorchPredictor, make_predictor
from cxrtriage.inference.radiograph import Radiograph
from cxrtriage.inference.training.metrics import dice

pytestmark = pytest.mark.slow

#: A small model: compiling it takes seconds, not the bundled models' half minute.
TINY = ModelSpec(arch="Unet", encoder="resnet18", input_size=64, in_channels=1, classification_head=True,
                 version="tiny-compile-test")


def test_compiled_pipeline_scores_as_the_eager_one(pipeline) -> None:
    settings = InferenceSettings(compile=True, threads=1)
    compiled = Pipeline(settings)  # ``compile: true`` wraps both bundled models
    assert compiled.lungs_model.compiled is not None  # type: ignore[attr-defined]
    assert compiled.disease_model.compiled is not None  # type: ignore[attr-defined]
    # Only Stage II runs compiled here: inductor takes about 15 s for its Unet and 55 s for Stage I's
    # DeepLabV3+/efficientnet-b1 on one core, and both go through the same ``compile_for_inference``.
    # ``bench/gpu.sh`` compiles both networks on the device (its ``ceiling_compiled`` phase).
    half = Pipeline(settings, lungs=pipeline.lungs_model, disease=compiled.disease_model)
    generator = PhantomGenerator(512, 480)
    for seed in range(6_100_000, 6_100_010):
        image = Radiograph(pixels=generator(seed).image, source=str(seed))
        a, b = pipeline(image), half(image)
        assert abs(a.p_disease - b.p_disease) < 1e-3
        assert dice(a.disease, b.disease) > 0.99
        assert a.scores.total == b.scores.total
        assert np.abs(np.array(a.scores.fractions) - np.array(b.scores.fractions)).max() < 0.01
    # every call after the first ran the compiled model: no silent fallback to eager
    assert half.disease_model.compiled is not None  # type: ignore[attr-defined]


def test_a_failed_compile_falls_back_to_the_eager_model_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch._dynamo
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # no graph compiled by another test may answer for this one
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))  # a machine without a C++ compiler
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    predictor = TorchPredictor(TINY, "cpu", compile=True)
    eager = TorchPredictor(TINY, "cpu")
    eager.model.load_state_dict(predictor.model.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 1, 64, 64)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="cxrtriage.inference.predictors"):
        probs, p = predictor(x)
    assert predictor.compiled is None
    assert "torch.compile failed" in caplog.text and "tiny-compile-test" in caplog.text
    expected, expected_p = eager(x)
    np.testing.assert_array_equal(probs, expected)
    assert p is not None and expected_p is not None
    np.testing.assert_array_equal(p, expected_p)
    torch._dynamo.reset()


def test_compile_is_refused_for_onnx_with_the_reason() -> None:
    with pytest.raises(ValueError, match="compile needs the torch backend"):
        make_predictor(TINY, "onnx", "cpu", compile=True)
