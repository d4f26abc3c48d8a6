"""The 18 checkpoints published with Danilov et al. 2022, as data.

They live as Git LFS files in ``ViacheslavDanilov/covid_scoring`` (branch
``master``) under ``models/models_{lungs,covid}/<Arch>_<encoder>_imagenet_<ddmmyy>_<HHMM>/weights.pth``.
Each is a bare ``torch.save(model.state_dict())`` written by the smp copy
vendored in that repository. Sizes and SHA-256 digests are those of the LFS
pointers: a downloaded or imported file is used only when both match.

No network code here: :mod:`cxrtriage.inference.model_cache` downloads,
imports and verifies; this module only says what the files are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .models import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from .scoring import DEFAULT_ZONE_THRESHOLD

#: Zone threshold T per Stage II architecture, as a fraction of zone area:
#: the optima of the published threshold sweep (covid_scoring,
#: resources/threshold_selection). DeepLabV3 had no usable optimum there
#: (its predictions were empty at every T): it gets the paper's default.
PAPER_ZONE_THRESHOLDS: dict[str, float] = {
    "DeepLabV3Plus": 0.30,
    "FPN": 0.26,
    "Linknet": 0.15,
    "MAnet": 0.31,
    "PAN": 0.40,
    "PSPNet": 0.38,
    "UnetPlusPlus": 0.33,
    "Unet": 0.30,
    "DeepLabV3": DEFAULT_ZONE_THRESHOLD,
}

REPOSITORY = "ViacheslavDanilov/covid_scoring"
BRANCH = "master"

#: Where the published inference took normalisation from:
#: ``smp.encoders.get_preprocessing_params(encoder, "imagenet")``. Every encoder
#: used here has the ImageNet statistics except dpn98 (pretrainedmodels'
#: DPN settings: mean (124, 117, 104) / 255, std 1 / (0.0167 * 255)).
DPN_MEAN = (124 / 255, 117 / 255, 104 / 255)
DPN_STD = (1 / (0.0167 * 255),) * 3

#: Input sizes are the ``--input_size`` of each run in the repository's
#: ``run_training_pipeline_lungs.sh`` / ``run_training_pipeline_covid.sh``
#: (the published inference resizes to the size the model was trained at).
LUNGS_SIZES_FROM = "covid_scoring run_training_pipeline_lungs.sh"
COVID_SIZES_FROM = "covid_scoring run_training_pipeline_covid.sh"

Stage = Literal["lungs", "disease"]


@dataclass(frozen=True)
class RegistryEntry:
    """One published checkpoint: what it is, where it lives, and how to check it."""

    name: str  #: registry name, e.g. ``covid/MAnet_timm-regnetx_064``
    stage: Stage
    path: str  #: path in the published repository
    arch: str  #: smp class name, e.g. ``MAnet``, ``DeepLabV3Plus``
    published_arch: str  #: as the paper writes it, e.g. ``DeepLabV3+``
    encoder: str  #: encoder name as published (smp < 0.5 spelling)
    input_size: int
    input_size_from: str  #: where ``input_size`` was read
    classification_head: bool  #: disease models: avg pooling, dropout 0.2, 1 class
    zone_threshold: float | None  #: T for disease models, None for lung models
    size: int  #: bytes
    sha256: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def cache_name(self) -> Path:
        """File name inside the model cache, derived from the registry name."""
        return Path(self.name + ".pth")

    @property
    def display_name(self) -> str:
        """The name clinicians see, e.g. ``Danilov et al. 2022 COVID-19 (MA-Net/regnetx_064)``."""
        label = {"MAnet": "MA-Net"}.get(self.published_arch, self.published_arch)
        task = "lungs" if self.stage == "lungs" else "COVID-19"
        return f"Danilov et al. 2022 {task} ({label}/{self.encoder.removeprefix('timm-')})"

    @property
    def version(self) -> str:
        return "danilov2022-" + self.name.replace("/", "-")

    def spec(self, weights: str | Path | None) -> ModelSpec:
        """The :class:`ModelSpec` of this checkpoint, its weights at ``weights``."""
        return ModelSpec(
            arch=self.arch,
            encoder=self.encoder,
            input_size=self.input_size,
            in_channels=3,
            classification_head=self.classification_head,
            mean=self.mean,
            std=self.std,
            zone_threshold=self.zone_threshold,
            weights=None if weights is None else str(weights),
            version=self.version,
            name=self.display_name,
            origin="published",
            training_data=("real",),
        )


def _entry(path: str, size: int, sha256: str, input_size: int) -> RegistryEntry:
    """Build an entry from its repository path, the way the published code parses run folders.

    ``models/models_covid/MAnet_timm-regnetx_064_imagenet_050921_1102/weights.pth``:
    architecture before the first ``_`` (no architecture name has one), encoder
    up to ``_imagenet_<date>_<time>``.
    """
    _, group, run, _ = path.split("/")
    prefix = group.removeprefix("models_")  # "lungs" or "covid"
    published_arch, rest = run.split("_", 1)
    encoder = rest.rsplit("_", 3)[0]
    arch = ARCHITECTURES[published_arch.lower()]
    disease = prefix == "covid"
    return RegistryEntry(
        name=f"{prefix}/{published_arch}_{encoder}",
        stage="disease" if disease else "lungs",
        path=path,
        arch=arch,
        published_arch=published_arch,
        encoder=encoder,
        input_size=input_size,
        input_size_from=COVID_SIZES_FROM if disease else LUNGS_SIZES_FROM,
        classification_head=disease,
        zone_threshold=PAPER_ZONE_THRESHOLDS[arch] if disease else None,
        size=size,
        sha256=sha256,
        mean=DPN_MEAN if encoder.startswith("dpn") else IMAGENET_MEAN,
        std=DPN_STD if encoder.startswith("dpn") else IMAGENET_STD,
    )


_L = "models/models_lungs/"
_C = "models/models_covid/"

ENTRIES: tuple[RegistryEntry, ...] = (
    _entry(_L + "DeepLabV3+_efficientnet-b1_imagenet_240821_2250/weights.pth", 30133598,
           "44a564ccc28d978b61e31651f00ea15f3a8ac5590fa91a07de89d441385baca4", 512),
    _entry(_L + "DeepLabV3_efficientnet-b0_imagenet_240821_2153/weights.pth", 29553297,
           "bc07dd6929fa1f2328b39e15fb7fdde8984007c7d9974bcc22e7c20e5df9d13c", 512),
    _entry(_L + "FPN_efficientnet-b0_imagenet_240821_2330/weights.pth", 23356124,
           "0b921fb44d46ff70123e9ed8b004d51515bb4de06a307f9229431f3d0da51ab0", 544),
    _entry(_L + "Linknet_timm-regnetx_064_imagenet_250821_0111/weights.pth", 117671016,
           "7c0f178725a0231d7f73cce2c92ab859b59be1de3fb16a42895c81f0aaee21a6", 480),
    _entry(_L + "MAnet_efficientnet-b2_imagenet_250821_0618/weights.pth", 54276223,
           "efc5c5364073fbd9e6e1bc9fa69db0be4ef3ca4b28d5cda130b54b9756f761c5", 512),
    _entry(_L + "PAN_efficientnet-b0_imagenet_250821_0537/weights.pth", 16738569,
           "950ac9e2f05808aa3284daa55c3e4c78696e09d22dff08a42f77cdc7c9dd20c9", 512),
    _entry(_L + "PSPNet_timm-regnety_064_imagenet_250821_0334/weights.pth", 119250191,
           "227a6a5d7038c5216806d92316b516015faf2e09d99a9225e3869d5b158ecda3", 480),
    _entry(_L + "Unet++_efficientnet-b1_imagenet_240821_2102/weights.pth", 36806447,
           "e60263c97cf4c2baaa009f3b234aca61fa1da91b4350200e34982bc9b9f4edfc", 384),
    _entry(_L + "Unet_se_resnext101_32x4d_imagenet_240821_1957/weights.pth", 224545777,
           "1ba613b3d2983520f6b64a0f95c6152fce74e0de76cb37e25021782476698de4", 384),
    _entry(_C + "DeepLabV3+_timm-regnetx_032_imagenet_040921_1741/weights.pth", 64837830,
           "f5c3a5b4ce1e7d73e6632f18f861ec7fd0f931621076a47d98eed8c38b553a1b", 480),
    _entry(_C + "DeepLabV3_efficientnet-b2_imagenet_030921_1234/weights.pth", 45438039,
           "73615126185595ad7f61e2f71599be0d6d6abe32076d333c9e95f0ea7aeff30f", 480),
    _entry(_C + "FPN_efficientnet-b0_imagenet_050921_1358/weights.pth", 23358382,
           "cd41e3bec2103500cfd5eb3ba8c94013a0e456d636e1f805c8038eee1004fa68", 384),
    _entry(_C + "Linknet_efficientnet-b0_imagenet_050921_1419/weights.pth", 17014784,
           "54adccb45e1e4720722d1ebb24cb4f1f0f74f52eb155097f69e56bf06e016ce2", 416),
    _entry(_C + "MAnet_timm-regnetx_064_imagenet_050921_1102/weights.pth", 416138775,
           "5535e6a5fb63e1afd9196de05eedb7b0c0bfe7a36a994cf87f147b0af8739326", 544),
    _entry(_C + "PAN_se_resnet50_imagenet_050921_0656/weights.pth", 107567603,
           "c04591d11f3fedab5f93450d8c3b91c5ef52754c77cf1cfb0a89c92610180be3", 416),
    _entry(_C + "PSPNet_efficientnet-b0_imagenet_030921_1848/weights.pth", 16544019,
           "387c2e2fd730871b0e58fad8721493a2476d74452f7501d719f9f9c392c8803d", 384),
    _entry(_C + "Unet++_timm-regnety_032_imagenet_050921_0826/weights.pth", 109294467,
           "1123aa18a7004cbc2685334c90e31838ed9ed340527349812fa23531ebf4be5d", 480),
    _entry(_C + "Unet_dpn98_imagenet_050921_0019/weights.pth", 286312874,
           "d892a114292cbbe8d02b44584ed169c6b9002dd337e24e155bda4d313444a184", 544),
)

REGISTRY: dict[str, RegistryEntry] = {entry.name: entry for entry in ENTRIES}

#: Named (lungs, disease) pairs; ``danilov2022`` is the paper's choice.
PAIRS: dict[str, tuple[str, str]] = {
    "danilov2022": ("lungs/DeepLabV3+_efficientnet-b1", "covid/MAnet_timm-regnetx_064"),
}


class UnknownModel(KeyError):
    """A name that is neither a registry entry nor a pair."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


def get(name: str) -> RegistryEntry:
    """The entry called ``name``; :class:`UnknownModel` names the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModel(
            f"unknown model {name!r}: choose a pair ({', '.join(PAIRS)}) or one of "
            f"{', '.join(REGISTRY)} (see `cxrtriage models list`)"
        ) from None


def expand(name: str) -> list[RegistryEntry]:
    """The entries a name stands for: both of a pair, or the one entry."""
    if name in PAIRS:
        return [get(member) for member in PAIRS[name]]
    return [get(name)]


def by_sha256(digest: str) -> RegistryEntry | None:
    """The entry whose file has this SHA-256, if any."""
    digest = digest.lower()
    return next((entry for entry in REGISTRY.values() if entry.sha256 == digest), None)
