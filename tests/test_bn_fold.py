"""BatchNorm folded into the convolutions: same outputs, every foldable pair folded, nothing folded on doubt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxrtriage.config import InferenceSettings
from cxrtriage.inference.bn_fold import example_input, fold_batch_norm
from cxrtriage.inference.models import ModelSpec, load_model
from cxrtriage.inference.predictors import TorchPredictor
from cxrtriage.inference.presets import model_specs


def _randomise_statistics(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters far from the identity, so that a wrong fold shows (variances
    above 1 and scales below it: deep random networks stay in range)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape  # type: ignore[union-attr]
            module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)  # type: ignore[union-attr]
            module.running_var.copy_(torch.rand(shape, generator=generator) * 2 + 1.0)  # type: ignore[union-attr]
            if module.affine:
                module.weight.data.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.5)
                module.bias.data.copy_(torch.rand(shape, generator=generator) - 0.5)


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _batch_norms_run(model: nn.Module, x: torch.Tensor) -> int:
    """BatchNorm2d layers that a forward pass calls: smp's EfficientNet encoders keep the classifier head's
    ``_bn1``, which their forward never reaches, so it has nothing to fold into and costs nothing."""
    called: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: called.add(m)) for m in model.modules()
             if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return len(called)


def test_the_bundled_predictors_fold_every_batch_norm_and_score_the_same() -> None:
    rng = np.random.default_rng(3)
    for spec in model_specs(InferenceSettings(device="cpu")):
        folded, plain = TorchPredictor(spec, "cpu"), TorchPredictor(spec, "cpu", fold_bn=False)
        batch = rng.random((2, spec.in_channels, spec.input_size, spec.input_size), dtype=np.float32)
        x = torch.from_numpy(batch)
        assert folded.folded == _batch_norms_run(plain.model, x) > 50 and _batch_norms_run(folded.model, x) == 0
        assert _batch_norms(folded.model) == _batch_norms(plain.model) - folded.folded
        (got, got_p), (want, want_p) = folded(batch), plain(batch)
        assert np.abs(got - want).max() < 1e-4
        assert (got > spec.pixel_threshold).sum() == pytest.approx((want > spec.pixel_threshold).sum(), abs=5)
        if want_p is not None:
            assert got_p is not None and np.abs(got_p - want_p).max() < 1e-4


@pytest.mark.parametrize("spec", [
    ModelSpec(arch="DeepLabV3Plus", encoder="efficientnet-b1", input_size=128),  # the paper's Stage I
    ModelSpec(arch="MAnet", encoder="timm-regnetx_064", input_size=128, classification_head=True),  # its Stage II
], ids=["deeplabv3plus-efficientnet-b1", "manet-regnetx_064"])
def test_the_papers_architectures_fold_including_timms_norm_act_layers(spec: ModelSpec) -> None:
    model = load_model(spec).to(memory_format=torch.channels_last)
    _randomise_statistics(model)
    before = _batch_norms(model)
    folded, count = fold_batch_norm(model, example_input(spec.in_channels, "cpu"))
    assert count >= before - 1 and _batch_norms(folded) == before - count  # ASPP's pooled branch may stay
    assert _batch_norms(model) == before  # the original is left as it was
    x = torch.rand(1, spec.in_channels, 96, 96).contiguous(memory_format=torch.channels_last)  # another size
    with torch.inference_mode():
        want, got = model(x), folded(x)
    for w, g in zip(*(o if isinstance(o, tuple) else (o,) for o in (want, got))):
        assert (w - g).abs().max() <= 1e-4 * w.abs().max()


class _Residual(nn.Module):
    """The conv's output feeds its BatchNorm and a shortcut: folding would change the shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_conv_whose_output_goes_elsewhere_too_is_left_alone() -> None:
    model = _Residual().eval()
    _randomise_statistics(model)
    folded, count = fold_batch_norm(model, torch.rand(1, 3, 16, 16))
    assert (folded, count) == (model, 0) and isinstance(model.bn, nn.BatchNorm2d)


def test_a_layer_between_conv_and_batch_norm_stops_the_pairing() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    _randomise_statistics(model)
    x = torch.rand(1, 3, 16, 16)
    folded, count = fold_batch_norm(model, x)
    assert count == 1  # only the last pair: the in-place ReLU returns the conv's own tensor, but is a layer between
    assert isinstance(folded[2], nn.BatchNorm2d) and isinstance(folded[4], nn.Identity)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_a_model_in_training_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train(), torch.rand(1, 3, 8, 8))


def test_inference_fold_batch_norm_false_runs_the_models_as_saved() -> None:
    from cxrtriage.inference.pipeline import Pipeline

    torch_cpu = InferenceSettings(device="cpu", backend="torch")  # folding is the torch backend's
    folded, plain = Pipeline(torch_cpu), Pipeline(torch_cpu.model_copy(update={"fold_batch_norm": False}))
    assert folded.lungs_model.folded > 50 and folded.disease_model.folded > 50  # type: ignore[attr-defined]
    assert plain.lungs_model.folded == plain.disease_model.folded == 0  # type: ignore[attr-defined]
    assert _batch_norms(plain.lungs_model.model) > 50  # type: ignore[attr-defined]
