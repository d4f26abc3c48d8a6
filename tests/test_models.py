"""Model factory, the published checkpoints' layout, and the bundled weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrtriage.config import InferenceSettings
from cxrtriage.inference.models import (
    ARCHITECTURES,
    WEIGHTS_DIR,
    ModelSpec,
    create_model,
    load_model,
    read_spec,
    save_bundled,
)
from cxrtriage.inference.presets import danilov2022

FIXTURE = Path(__file__).parents[1] / "cxrtriage/inference/fixtures/published_checkpoint_keys.json"


def published_layouts() -> dict[str, dict]:
    """Key names and shapes of the paper's checkpoints, recorded with smp 0.4.0."""
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", ["DeepLabV3+_efficientnet-b1", "MAnet_timm-regnetx_064"])
def test_published_checkpoint_loads_strictly(name: str, tmp_path: Path) -> None:
    layout = published_layouts()[name]
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) if shape else torch.tensor(7) for k, shape in layout["keys"].items()}
    path = tmp_path / "weights.pth"
    torch.save(state, path)  # the format of covid_scoring's weights.pth: a bare state_dict

    lungs, disease = danilov2022()
    spec = (lungs if "DeepLab" in name else disease).model_copy(update={"weights": str(path)})
    assert spec.input_size == layout["input_size"]
    model = load_model(spec)  # strict=True inside: any missing or extra key fails
    loaded = model.state_dict()
    assert len(loaded) == len(state)
    # Values land where they belong, also for the renamed regnet encoder keys.
    for key, value in list(state.items())[:: max(1, len(state) // 25)]:
        new_key = key if key in loaded else "encoder.model." + key.removeprefix("encoder.")
        assert torch.equal(loaded[new_key].float(), value.float()), key


def test_a_wrong_checkpoint_is_refused(tmp_path: Path) -> None:
    layout = published_layouts()["DeepLabV3+_efficientnet-b1"]
    state = {k: torch.zeros(shape) for k, shape in layout["keys"].items()}
    state.pop(next(iter(state)))
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    lungs, _ = danilov2022()
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model(lungs.model_copy(update={"weights": str(path)}))


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES.values())))
def test_every_paper_architecture_builds(arch: str) -> None:
    # 128 px: PAN's pyramid pooling needs at least that much.
    spec = ModelSpec(arch=arch, encoder="resnet18", input_size=128, classification_head=True)
    model = create_model(spec).eval()
    with torch.inference_mode():
        seg, cls = model(torch.zeros(1, 3, 128, 128))
    assert seg.shape == (1, 1, 128, 128) and cls.shape == (1, 1)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        ModelSpec(arch="SegFormerXL", encoder="resnet18")


def test_bundled_format_round_trips(tmp_path: Path) -> None:
    spec = ModelSpec(arch="Unet", encoder="resnet18", input_size=64, in_channels=1, classification_head=True,
                     zone_threshold=0.25, version="test-1")
    model = create_model(spec).eval()
    path = save_bundled(model, spec, tmp_path / "m.safetensors", {"note": "test"})
    again = read_spec(path)
    assert again.zone_threshold == 0.25 and again.version == "test-1" and again.weights == str(path)
    reloaded = load_model(again)
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        a, b = model(x)[0], reloaded(x)[0]
    assert torch.allclose(a, b, atol=0.05)  # fp16 storage


def test_bundled_weights_are_small_and_self_describing() -> None:
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    assert {f.name for f in files} >= {"lungs.safetensors", "disease.safetensors"}
    assert sum(f.stat().st_size for f in files) <= 40 * 1024 * 1024
    lungs, disease = InferenceSettings().model_specs()
    assert lungs.version.startswith("lungs-") and disease.version.startswith("disease-")
    assert disease.classification_head and disease.zone_threshold is not None


def test_safetensors_override_brings_its_own_spec(tmp_path: Path) -> None:
    spec = ModelSpec(arch="FPN", encoder="resnet18", input_size=64, in_channels=1, version="mine")
    path = save_bundled(create_model(spec), spec, tmp_path / "mine.safetensors")
    lungs, _ = InferenceSettings(lungs={"weights": str(path)}).model_specs()
    assert lungs.arch == "FPN" and lungs.version == "mine"


def test_paper_preset_uses_paper_threshold_and_sizes() -> None:
    settings = InferenceSettings(preset="danilov2022")
    lungs, disease = settings.model_specs()
    assert (lungs.arch, lungs.encoder, lungs.input_size) == ("DeepLabV3Plus", "efficientnet-b1", 512)
    assert (disease.arch, disease.smp_encoder, disease.input_size) == ("MAnet", "tu-regnetx_064", 544)
    assert disease.zone_threshold == pytest.approx(0.31)
    assert np.allclose(lungs.mean, (0.485, 0.456, 0.406))
