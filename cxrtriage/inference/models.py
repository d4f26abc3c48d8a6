"""One factory for the segmentation models of both stages.

Models are segmentation_models_pytorch architectures built with
``encoder_weights=None``: the node never downloads anything. Weights come
from two kinds of file:

* ``.safetensors``, the bundled format: fp16 tensors plus the
  :class:`ModelSpec` as JSON in the file's metadata, so a file describes the
  model it belongs to;
* ``.pth`` / ``.pt``, a ``torch.save(model.state_dict())`` checkpoint such as
  the ones published with Danilov et al. 2022. Encoder names that smp has
  since renamed (``timm-regnetx_064`` became ``tu-regnetx_064`` in smp 0.5)
  are remapped, and loading is always ``strict=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Architecture names as the paper writes them, mapped to smp's class names.
ARCHITECTURES: dict[str, str] = {
    "unet": "Unet",
    "unet++": "UnetPlusPlus",
    "unetplusplus": "UnetPlusPlus",
    "deeplabv3": "DeepLabV3",
    "deeplabv3+": "DeepLabV3Plus",
    "deeplabv3plus": "DeepLabV3Plus",
    "fpn": "FPN",
    "linknet": "Linknet",
    "pspnet": "PSPNet",
    "pan": "PAN",
    "manet": "MAnet",
}

#: smp < 0.5 shipped its own wrappers for these timm encoders; smp >= 0.5
#: serves them through the timm universal encoder ("tu-" prefix), whose
#: parameters live one level deeper, under ``encoder.model.``.
LEGACY_TIMM_ENCODERS = ("timm-regnet", "timm-res2net", "timm-resnest", "timm-gernet", "timm-skresnet")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WEIGHTS_DIR = Path(__file__).parent / "weights"

#: What a model may have been trained on. Only "real" means real radiographs;
#: a model without it produces research-use results (labelled wherever shown).
TRAINING_DATA_KINDS = ("synthetic", "ct-derived", "real")


class ModelSpec(BaseModel):
    """Everything needed to rebuild a model and feed it."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="smp architecture, e.g. DeepLabV3Plus, MAnet, Unet")
    encoder: str = Field(description="smp encoder name, e.g. efficientnet-b1")
    input_size: int = Field(256, ge=32, le=2048, description="square model input, pixels")
    in_channels: int = Field(3, ge=1, le=3)
    classification_head: bool = Field(False, description="smp aux_params head giving P(disease)")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    equalize: bool = Field(
        False, description="histogram-equalise the whole image before this stage (bundled models: true)"
    )
    pixel_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    zone_threshold: float | None = Field(None, ge=0.0, le=1.0, description="T: zone fraction > T scores 1")
    weights: str | None = Field(None, description="path, or a file name in the bundled weights folder")
    version: str = "unversioned"
    name: str | None = Field(None, description="human-readable model name shown to clinicians; default: version")
    origin: str = Field("user", description="bundled | published | user: who made the weights")
    training_data: tuple[str, ...] = Field(
        (), description="what it was trained on: synthetic, ct-derived, real; empty = not stated"
    )

    @field_validator("training_data")
    @classmethod
    def _known_training_data(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in TRAINING_DATA_KINDS]
        if unknown:
            raise ValueError(f"unknown training data {unknown}; choose from {list(TRAINING_DATA_KINDS)}")
        return value

    @property
    def trained_on_real_radiographs(self) -> bool:
        """False for models trained only on synthetic or CT-derived images, or on data not stated."""
        return "real" in self.training_data

    @property
    def display_name(self) -> str:
        return self.name or self.version

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        key = value.lower().replace("_", "").replace("-", "")
        if key not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; choose one of {sorted(set(ARCHITECTURES.values()))}")
        return ARCHITECTURES[key]

    @property
    def smp_encoder(self) -> str:
        """The encoder name current smp knows (legacy timm wrappers mapped to ``tu-``)."""
        if self.encoder.startswith(LEGACY_TIMM_ENCODERS):
            return "tu-" + self.encoder.removeprefix("timm-")
        return self.encoder

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Normalisation mean/std with one value per input channel."""
        mean, std = list(self.mean), list(self.std)
        if len(mean) != self.in_channels:
            mean = [sum(mean) / len(mean)] * self.in_channels
            std = [sum(std) / len(std)] * self.in_channels
        return mean, std


def create_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the (untrained) smp model a spec describes. Never downloads."""
    import segmentation_models_pytorch as smp

    aux = None
    if spec.classification_head:
        # Danilov et al.: average pooling, dropout 0.2, one sigmoid output.
        aux = dict(pooling="avg", dropout=0.2, activation=None, classes=1)
    return smp.create_model(
        spec.arch,
        encoder_name=spec.smp_encoder,
        encoder_weights=None,
        in_channels=spec.in_channels,
        classes=1,
        activation=None,
        aux_params=aux,
        **spec.arch_kwargs,
    )


def resolve_weights(name: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path
    bundled = WEIGHTS_DIR / name
    if bundled.exists():
        return bundled
    raise FileNotFoundError(f"model weights not found: {name} (looked in {path.resolve()} and {WEIGHTS_DIR})")


def remap_legacy_keys(state_dict: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Rename encoder keys of checkpoints saved by smp < 0.5 for legacy timm encoders.

    ``encoder.stem.conv.weight`` becomes ``encoder.model.stem.conv.weight``;
    other keys are unchanged. A state dict that is already in the new layout
    passes through untouched.
    """
    if not spec.encoder.startswith(LEGACY_TIMM_ENCODERS):
        return dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("encoder.") and not key.startswith("encoder.model."):
            key = "encoder.model." + key.removeprefix("encoder.")
        out[key] = value
    return out


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(path)).items()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} is not a state_dict checkpoint (found {type(state).__name__})")
    return dict(state)


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build a model and load its weights (strict); eval mode on ``device``."""
    model = create_model(spec)
    if spec.weights:
        state = remap_legacy_keys(read_state_dict(resolve_weights(spec.weights)), spec)
        model.load_state_dict(state, strict=True)
    return model.eval().to(device)


def read_spec(path: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` stored in a bundled ``.safetensors`` file."""
    from safetensors import safe_open

    path = resolve_weights(str(path))
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "cxrtriage_spec" not in meta:
        raise ValueError(f"{path} carries no cxrtriage model spec in its metadata")
    spec = ModelSpec.model_validate(json.loads(meta["cxrtriage_spec"]))
    return spec.model_copy(update={"weights": str(path)})


def save_bundled(model: torch.nn.Module, spec: ModelSpec, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Save fp16 weights plus the spec (and ``extra`` facts) as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.detach().to("cpu").half() if v.is_floating_point() else v.detach().to("cpu")).contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {"cxrtriage_spec": spec.model_copy(update={"weights": None}).model_dump_json()}
    if extra:
        meta["cxrtriage_training"] = json.dumps(extra, default=str)
    save_file(tensors, str(path), metadata=meta)
    return path
