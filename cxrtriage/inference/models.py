"""One factory for the segmentation models of both stages.

Models are segmentation_models_pytorch architectures built with
``encoder_weights=None``: the node never downloads anything. Weights come
from two kinds of file:

* ``.safetensors``, the bundled format: fp16 tensors plus the
  :class:`ModelSpec` as JSON in the file's metadata, so a file describes the
  model it belongs to;
* ``.pth`` / ``.pt``, a ``torch.save(model.state_dict())`` checkpoint such as
  the ones published with Danilov et al. 2022 (saved by smp < 0.5). Keys that
  smp has since moved are renamed (:func:`legacy_key`: the ``timm-regnet*``
  wrappers became ``tu-`` encoders in smp 0.5, the DeepLabV3 decoder got named
  submodules), and loading is always ``strict=True``.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    disease_gate: float = Field(
        0.5, gt=0.0, lt=1.0, description="disease models: Stage II's opacity counts only where P(disease) >= this "
        "(the paper: 0.5); an image below it scores 0 in every zone"
    )
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
    model = smp.create_model(
        spec.arch,
        encoder_name=spec.smp_encoder,
        encoder_weights=None,
        in_channels=spec.in_channels,
        classes=1,
        activation=None,
        aux_params=aux,
        **spec.arch_kwargs,
    )
    if spec.encoder.startswith("timm-regnet"):
        _dilate_like_smp04(model.encoder, _arch_default(spec, "encoder_output_stride", 32))
    return model


def _arch_default(spec: ModelSpec, parameter: str, fallback: int) -> int:
    """``arch_kwargs[parameter]``, else the smp architecture's default for it (``fallback`` if it has none)."""
    if parameter in spec.arch_kwargs:
        return int(spec.arch_kwargs[parameter])
    import segmentation_models_pytorch as smp

    found = inspect.signature(getattr(smp, spec.arch)).parameters.get(parameter)
    return fallback if found is None or found.default is inspect.Parameter.empty else int(found.default)


def _dilate_like_smp04(encoder: torch.nn.Module, output_stride: int) -> None:
    """Dilate every k x k conv of a RegNet stage by the stage's full rate, as smp < 0.5 did.

    DeepLabV3 (output stride 8) and DeepLabV3+ (16) trade the last strides for
    dilation. smp < 0.5 gave every conv of stage ``s<k>`` the rate
    ``2**(k+1) / output_stride`` (``make_dilated``); timm, which serves these
    encoders since smp 0.5, keeps each dilated stage's first block at the
    previous rate. Same weights, different network: a published
    DeepLabV3+/timm-regnetx_032 loads strictly and yet computes something else
    without this (found by comparing outputs of smp 0.4.0 and 0.6.0).
    """
    model = getattr(encoder, "model", None)
    if model is None or output_stride >= 32:
        return
    for name, stage in model.named_children():
        match = re.fullmatch(r"s(\d)", name)
        rate = 2 ** (int(match.group(1)) + 1) // output_stride if match else 1
        if rate <= 1:
            continue
        for conv in stage.modules():
            if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size[0] > 1:
                conv.dilation = (rate, rate)
                conv.padding = (conv.kernel_size[0] // 2 * rate, conv.kernel_size[1] // 2 * rate)


def resolve_weights(name: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path
    bundled = WEIGHTS_DIR / name
    if bundled.exists():
        return bundled
    raise FileNotFoundError(f"model weights not found: {name} (looked in {path.resolve()} and {WEIGHTS_DIR})")


#: smp < 0.5 built DeepLabV3's decoder as ``Sequential(ASPP, Conv, BN, ReLU)``;
#: smp >= 0.5 names the same modules ``aspp``, ``conv`` and ``bn``.
_DEEPLABV3_DECODER = {"decoder.0.": "decoder.aspp.", "decoder.1.": "decoder.conv.", "decoder.2.": "decoder.bn."}

#: Stage modules of the legacy timm RegNet wrapper: ``s1`` .. ``s4``.
_REGNET_STAGE = re.compile(r"^encoder\.model\.s(\d)\.")


def encoder_depth(spec: ModelSpec) -> int:
    """How many encoder stages the smp model uses (PSPNet defaults to 3, the others to 5)."""
    return _arch_default(spec, "encoder_depth", 5)


def legacy_key(key: str, spec: ModelSpec) -> str | None:
    """The current smp name of a checkpoint key saved by smp < 0.5; None for a parameter smp no longer builds.

    * legacy timm encoders: ``encoder.X`` -> ``encoder.model.X`` (smp 0.5 serves
      them through the timm universal encoder, one level deeper);
    * RegNet stages beyond the encoder depth (PSPNet uses 3 of 5) are None: the
      old wrapper built and saved all stages although forward never ran them,
      the universal encoder does not build them at all;
    * DeepLabV3: ``decoder.0/1/2.`` -> ``decoder.aspp/conv/bn.``.

    Keys already in the new layout pass through unchanged.
    """
    if spec.encoder.startswith(LEGACY_TIMM_ENCODERS) and key.startswith("encoder."):
        if not key.startswith("encoder.model."):
            key = "encoder.model." + key.removeprefix("encoder.")
        stage = _REGNET_STAGE.match(key)
        if spec.encoder.startswith("timm-regnet") and stage and int(stage.group(1)) >= encoder_depth(spec):
            return None
    if spec.arch == "DeepLabV3":
        for old, new in _DEEPLABV3_DECODER.items():
            if key.startswith(old):
                return new + key.removeprefix(old)
    return key


def remap_legacy_keys(state_dict: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Rename (and drop never-used) keys of checkpoints saved by smp < 0.5, see :func:`legacy_key`.

    ``encoder.stem.conv.weight`` of a ``timm-regnetx_064`` checkpoint becomes
    ``encoder.model.stem.conv.weight``. A state dict that is already in the new
    layout passes through untouched; the strict load that follows still
    refuses any other missing or unexpected key.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = legacy_key(key, spec)
        if new_key is not None:
            out[new_key] = value
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


def save_bundled(
    model: torch.nn.Module, spec: ModelSpec, path: str | Path, extra: Mapping[str, Any] | None = None
) -> Path:
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
