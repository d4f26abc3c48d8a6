"""Model factory, the published checkpoints' layout, and the bundled weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrtriage.config import InferenceSettings
from cxrtriage.inference.model_cache import ModelNotCached, cached_path
from cxrtriage.inference.models import (
    ARCHITECTURES,
    WEIGHTS_DIR,
    ModelSpec,
    create_model,
    legacy_key,
    load_model,
    read_spec,
    save_bundled,
)
from cxrtriage.inference.presets import model_specs
from cxrtriage.inference.registry import REGISTRY, expand

FIXTURE = Path(__file__).parents[1] / "cxrtriage/inference/fixtures/published_checkpoint_keys.json"


def published_layouts() -> dict[str, dict]:
    """Key names and shapes of the 18 published checkpoints, recorded with smp 0.4.0, by registry name."""
    return json.loads(FIXTURE.read_text())


@pytest.fixture
def model_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CXRTRIAGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_published_checkpoint_loads_strictly(name: str, tmp_path: Path) -> None:
    """Each published layout, saved as a bare state_dict, loads strictly into the installed smp."""
    layout = published_layouts()[name]
    entry = REGISTRY[name]
    assert (layout["arch"], layout["encoder"], layout["input_size"]) == (entry.arch, entry.encoder, entry.input_size)
    # One constant per tensor (cheap as zeros) so that every value's destination can be checked.
    state = {
        k: torch.full(shape, float(i + 1)) if shape else torch.tensor(i + 1)
        for i, (k, shape) in enumerate(layout["keys"].items())
    }
    path = tmp_path / "weights.pth"
    torch.save(state, path)  # the format of covid_scoring's weights.pth: a bare state_dict
    spec = entry.spec(path)
    del state
    model = load_model(spec)  # strict=True inside: any missing or extra key fails
    loaded = model.state_dict()
    dropped = 0
    for i, key in enumerate(layout["keys"]):
        new_key = legacy_key(key, spec)
        if new_key is None:  # RegNet stages the old wrapper saved but never ran (PSPNet, depth 3)
            dropped += 1
            continue
        tensor = loaded[new_key]
        assert list(tensor.shape) == layout["keys"][key], key
        assert tensor.reshape(-1)[:1].item() == i + 1 and tensor.reshape(-1)[-1:].item() == i + 1, key
    assert len(loaded) == len(layout["keys"]) - dropped
    assert dropped == (364 if name == "lungs/PSPNet_timm-regnety_064" else 0)


def test_a_wrong_checkpoint_is_refused(tmp_path: Path) -> None:
    layout = published_layouts()["lungs/DeepLabV3+_efficientnet-b1"]
    state = {k: torch.zeros(shape) for k, shape in layout["keys"].items()}
    state.pop(next(iter(state)))
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    spec = REGISTRY["lungs/DeepLabV3+_efficientnet-b1"].spec(path)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model(spec)


@pytest.mark.parametrize(("arch", "encoder", "rates"), [
    ("DeepLabV3Plus", "timm-regnetx_032", {"s3": {1}, "s4": {2}}),  # output stride 16
    ("DeepLabV3", "timm-regnety_032", {"s3": {2}, "s4": {4}}),  # output stride 8
])
def test_legacy_regnet_encoders_are_dilated_like_smp_0_4(arch: str, encoder: str, rates: dict[str, set[int]]) -> None:
    """smp < 0.5 dilated every conv of a stage; timm keeps each stage's first block at the old rate."""
    model = create_model(ModelSpec(arch=arch, encoder=encoder))
    for stage, expected in rates.items():
        convs = [m for m in getattr(model.encoder.model, stage).modules()
                 if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1]
        assert {m.dilation[0] for m in convs} == expected and {m.padding[0] for m in convs} == expected


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
    lungs, disease = model_specs(InferenceSettings())
    assert lungs.version.startswith("lungs-") and disease.version.startswith("disease-")
    assert disease.classification_head and disease.zone_threshold is not None


def test_safetensors_override_brings_its_own_spec(tmp_path: Path) -> None:
    spec = ModelSpec(arch="FPN", encoder="resnet18", input_size=64, in_channels=1, version="mine")
    path = save_bundled(create_model(spec), spec, tmp_path / "mine.safetensors")
    lungs, _ = model_specs(InferenceSettings(lungs={"weights": str(path)}))
    assert lungs.arch == "FPN" and lungs.version == "mine"


def test_paper_preset_uses_paper_threshold_and_sizes(model_cache_dir: Path) -> None:
    with pytest.raises(ModelNotCached, match="cxrtriage models pull danilov2022"):
        model_specs(InferenceSettings(preset="danilov2022"))
    for entry in expand("danilov2022"):  # sparse files of the right size stand in for the downloads
        cached_path(entry).parent.mkdir(parents=True, exist_ok=True)
        with open(cached_path(entry), "wb") as handle:
            handle.truncate(entry.size)
    settings = InferenceSettings(preset="danilov2022")
    lungs, disease = model_specs(settings)
    assert (lungs.arch, lungs.encoder, lungs.input_size) == ("DeepLabV3Plus", "efficientnet-b1", 512)
    assert (disease.arch, disease.smp_encoder, disease.input_size) == ("MAnet", "tu-regnetx_064", 544)
    assert disease.zone_threshold == pytest.approx(0.31)
    assert np.allclose(lungs.mean, (0.485, 0.456, 0.406))
    assert Path(disease.weights) == model_cache_dir / "covid/MAnet_timm-regnetx_064.pth"
    assert disease.name == "Danilov et al. 2022 COVID-19 (MA-Net/regnetx_064)" and disease.origin == "published"
    # explicit weights in config still win over the cache
    lungs, _ = model_specs(InferenceSettings(preset="danilov2022", lungs={"weights": "/models/lungs.pth"}))
    assert lungs.weights == "/models/lungs.pth"
