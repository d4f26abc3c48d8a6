"""The ONNX Runtime backend gives the same results as eager torch; ``auto`` picks it on the CPU and falls back."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cxrtriage.config import InferenceSettings
from cxrtriage.inference.models import ModelSpec
from cxrtriage.inference.phantom import PhantomGenerator
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.predictors import OnnxPredictor, TorchPredictor, make_predictor, resolve_backend
from cxrtriage.inference.radiograph import Radiograph
from cxrtriage.inference.training.metrics import dice

TINY = ModelSpec(arch="Unet", encoder="resnet18", input_size=64, in_channels=1, classification_head=True,
                 version="tiny-onnx-test")


def test_auto_is_onnx_runtime_for_fp32_on_the_cpu_and_torch_otherwise() -> None:
    assert InferenceSettings().backend == "auto"
    assert resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "cpu", "bf16") == "torch"  # ONNX Runtime runs fp32 here
    assert resolve_backend("auto", "cpu", compile=True) == "torch"  # torch.compile is torch's
    assert resolve_backend("torch", "cpu") == "torch" and resolve_backend("onnx", "cpu") == "onnx"


def test_auto_falls_back_to_torch_saying_why_where_onnx_runtime_cannot_take_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("CXRTRIAGE_CACHE", str(blocker))  # the export cache cannot be made
    with caplog.at_level(logging.WARNING, logger="cxrtriage.inference.predictors"):
        predictor = make_predictor(TINY, "auto", "cpu")
    assert isinstance(predictor, TorchPredictor)
    assert "ONNX Runtime unavailable" in caplog.text and "running it with torch" in caplog.text
    with pytest.raises(OSError):  # asked for by name, ONNX Runtime or nothing
        make_predictor(TINY, "onnx", "cpu")
    monkeypatch.setenv("CXRTRIAGE_CACHE", str(tmp_path / "cache"))
    assert isinstance(make_predictor(TINY, "auto", "cpu"), OnnxPredictor)


@pytest.mark.slow
def test_onnx_and_torch_give_the_same_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRTRIAGE_CACHE", str(tmp_path))
    pipeline = Pipeline(InferenceSettings(backend="torch"))
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
