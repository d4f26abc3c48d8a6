"""Ready-made model pairs: the bundled demonstration models and the paper's setup."""

from __future__ import annotations

from .models import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, read_spec

#: Zone threshold T per Stage II architecture, as a fraction of zone area:
#: the optima of the published threshold sweep (covid_scoring,
#: resources/threshold_selection). DeepLabV3 had no usable optimum there.
PAPER_ZONE_THRESHOLDS: dict[str, float] = {
    "DeepLabV3Plus": 0.30,
    "FPN": 0.26,
    "Linknet": 0.15,
    "MAnet": 0.31,
    "PAN": 0.40,
    "PSPNet": 0.38,
    "UnetPlusPlus": 0.33,
    "Unet": 0.30,
    "DeepLabV3": 0.30,
}

BUNDLED_LUNGS = "lungs.safetensors"
BUNDLED_DISEASE = "disease.safetensors"


def bundled() -> tuple[ModelSpec, ModelSpec]:
    """The small models that ship in the package (never trained on real radiographs)."""
    specs = []
    for file, label in ((BUNDLED_LUNGS, "lungs"), (BUNDLED_DISEASE, "disease")):
        spec = read_spec(file)
        specs.append(spec.model_copy(update={
            "origin": "bundled",
            "name": spec.name or f"cxrtriage bundled {label} ({spec.arch}/{spec.encoder})",
            # files written before training_data was recorded were trained on phantoms only
            "training_data": spec.training_data or ("synthetic",),
        }))
    return specs[0], specs[1]


def danilov2022() -> tuple[ModelSpec, ModelSpec]:
    """Danilov et al. 2022: DeepLabV3+/efficientnet-b1 @ 512 and MA-Net/regnetx_064 @ 544.

    Weights are not bundled (30 MB and 416 MB); point ``lungs.weights`` and
    ``disease.weights`` in config.yaml at the published ``weights.pth`` files.
    """
    lungs = ModelSpec(
        arch="DeepLabV3Plus", encoder="efficientnet-b1", input_size=512, in_channels=3,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, version="danilov2022-lungs-DeepLabV3+_efficientnet-b1",
        name="Danilov et al. 2022 lungs (DeepLabV3+/efficientnet-b1)", origin="published", training_data=("real",),
    )
    disease = ModelSpec(
        arch="MAnet", encoder="timm-regnetx_064", input_size=544, in_channels=3, classification_head=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, zone_threshold=PAPER_ZONE_THRESHOLDS["MAnet"],
        version="danilov2022-covid-MAnet_timm-regnetx_064",
        name="Danilov et al. 2022 COVID-19 (MA-Net/regnetx_064)", origin="published", training_data=("real",),
    )
    return lungs, disease


PRESETS = {"bundled": bundled, "danilov2022": danilov2022}
