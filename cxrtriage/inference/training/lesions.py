"""COVID-19-like pneumonia lesions drawn in 3D inside the lungs of a CT volume.

Lesions are thresholded smooth noise (irregular, multifocal), biased toward
the lung periphery and the bases as bilateral COVID-19 pneumonia usually
is. Ground glass raises lung tissue to about -700 to -300 HU, consolidation
to about -100 to +50 HU; "mixed" puts consolidated cores in ground glass.
The membership (0..1 per voxel) is returned as well, so the projected
lesion thickness gives the radiograph's opacity mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("ground_glass", "consolidation", "mixed")


@dataclass
class Lesions:
    hu: np.ndarray  # the volume's HU with the lesions in
    membership: np.ndarray  # float32 0..1, the lesion's share of each voxel
    kind: str  # "none", or one of KINDS
    sides: tuple[str, ...]  # "right", "left"
    fraction: float  # share of the affected lungs' volume


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise with about ``cells`` features along the longest axis."""
    coarse = [max(2, int(round(cells * n / max(shape)))) for n in shape]
    field = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))[None, None]
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    out = F.interpolate(field, size=list(shape), mode=mode, align_corners=False)[0, 0].numpy()
    return (out - out.mean()) / (out.std() or 1.0)


def _periphery(lungs: np.ndarray) -> np.ndarray:
    """1 near the lung surface, 0 deep inside (a blurred mask, on a half-size grid for speed)."""
    from scipy import ndimage

    small = lungs[::2, ::2, ::2].astype(np.float32)
    inner = ndimage.gaussian_filter(small, sigma=3.0)
    t = torch.from_numpy(inner)[None, None]
    full = F.interpolate(t, size=list(lungs.shape), mode="trilinear", align_corners=False)[0, 0].numpy()
    return np.clip(1.0 - full, 0.0, 1.0) * lungs


def _basal(lungs: np.ndarray) -> np.ndarray:
    """0 at the lung apices, 1 at the bases (axis 2 runs superior)."""
    zs = np.flatnonzero(lungs.any(axis=(0, 1)))
    z = np.arange(lungs.shape[2], dtype=np.float32)
    ramp = np.clip((zs[-1] - z) / max(1, zs[-1] - zs[0]), 0.0, 1.0)
    return np.broadcast_to(ramp[None, None, :], lungs.shape)


def insert_lesions(
    rng: np.random.Generator,
    hu: np.ndarray,
    right: np.ndarray,
    left: np.ndarray,
    p_normal: float = 0.35,
) -> Lesions:
    """Draw lesions (or none, with probability ``p_normal``) into ``hu``."""
    empty = np.zeros(hu.shape, dtype=np.float32)
    if rng.random() < p_normal:
        return Lesions(hu, empty, "none", (), 0.0)
    sides = ("right", "left") if rng.random() < 0.7 else (("right",) if rng.random() < 0.5 else ("left",))
    lungs = np.zeros(hu.shape, dtype=bool)
    for side in sides:
        lungs |= right if side == "right" else left
    if lungs.sum() < 50:
        return Lesions(hu, empty, "none", (), 0.0)
    kind = str(rng.choice(KINDS, p=[0.5, 0.2, 0.3]))
    # Extent from a few percent to most of the lung, skewed small as in the wards.
    fraction = float(np.clip(np.exp(rng.uniform(np.log(0.03), np.log(0.6))), 0.02, 0.7))
    field = smooth_noise(rng, hu.shape, int(rng.integers(6, 14)))
    field += 0.35 * smooth_noise(rng, hu.shape, int(rng.integers(16, 28)))
    field += rng.uniform(0.5, 2.0) * _periphery(lungs) + rng.uniform(0.0, 1.5) * _basal(lungs)
    values = field[lungs]
    cut = float(np.quantile(values, 1.0 - fraction))
    soft = 0.15 * float(values.std())
    membership = np.clip((field - cut) / soft + 0.5, 0.0, 1.0) * lungs
    texture = smooth_noise(rng, hu.shape, 40)
    if kind == "ground_glass":
        target = rng.uniform(-700, -300) + 60.0 * texture
    elif kind == "consolidation":
        target = rng.uniform(-100, 50) + 30.0 * texture
    else:  # consolidated cores inside ground glass
        core = np.clip((field - np.quantile(values, 1.0 - 0.4 * fraction)) / soft, 0.0, 1.0)
        target = (1 - core) * (rng.uniform(-650, -350) + 60.0 * texture) + core * rng.uniform(-100, 40)
    # Vessels and walls denser than the lesion stay visible through it.
    lesioned = np.maximum(hu, target).astype(np.float32)
    out = hu + membership * (lesioned - hu)
    return Lesions(out.astype(np.float32), membership.astype(np.float32), kind, sides, fraction)
