"""Digitally reconstructed radiographs (DRRs) of a chest CT, with exact truth.

Each seed draws one radiograph of a :class:`~.ct.CTVolume`:

1. **Anatomy is deformed** so that a model cannot learn one patient: patient
   size and anisotropic scaling, small rotations about all three axes, a
   smooth elastic warp, deeper or shallower inspiration (the diaphragm moves),
   rib and soft-tissue density scaling. One 3D ``grid_sample`` does it all.
2. **Gas below the diaphragm**: a standing film shows the gastric air
   bubble under the left dome and colonic gas; the supine CT holds little
   and in the wrong place. Gas pockets (-1000 HU) are drawn into the stomach
   (an erect air-fluid level or supine anterior gas) and colon labels when
   the label map names them, and a fundus bubble right under the left dome
   of any CT. **Lesions** (:mod:`.lesions`) are drawn in 3D inside the
   deformed lungs; about 35 % of the radiographs have none.
3. **Perspective projection** (a cone beam, not parallel rays): PA views with
   a 150-190 cm source-image distance, AP views with 100-130 cm, so near and
   far structures magnify differently. The volume is cut into coronal slices;
   each slice is magnified by SID / (source-slice distance) onto the detector
   and the attenuation summed along the rays (times the ray's obliquity).
4. **Attenuation and detector**: HU becomes linear attenuation with an extra
   bone weight (lower kVp, more bone contrast), scatter adds a blurred
   fraction of the primary beam, then a log transform, a random tone curve
   (gamma / sigmoid), blur and noise. Collimation borders (bright or black)
   and burned-in markers ("L"/"R" letters, text) are drawn on top.

The shipped CT was scanned supine with the arms up: shoulders and scapulae sit
differently from a standing PA film, and its 36 cm field of view cuts the
lateral chest wall. Nothing here corrects that; the model card says so.

Output images are float32 in [0, 1], MONOCHROME2 (air dark, bone bright) in
the display orientation: the patient's right on the image left, head up.

Truth: the **lung field** of a radiograph is what readers outline, not the
full projection of the 3D lungs (which runs behind the heart and, through the
posterior recesses, below the diaphragm domes). A pixel is lung when the
ray's path through that lung is at least ``lung_field_fraction`` of the
lung's typical (95th percentile) path; below the domes and behind the heart
the path through lung is short. The opacity mask is what a film can show:
inside the lung field, where the projected lesion is thicker than
``lesion_threshold_mm`` **and** adds at least ``lesion_visible_mm`` of
water-equivalent attenuation along the ray (since ``drr-3``; a thin sheet of
faint ground glass changes the transmitted beam by a percent or two and is
invisible on a radiograph). The disease label is whether that mask is
non-empty. No lung-field pixel lies below the domes: in each image column,
rows at and below the first one whose ray crosses more than
``abdomen_threshold_mm`` of abdomen (the labelled abdominal organs and the
fundus bubble) are not lung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..phantom import Phantom
from .ct import ORGAN_COLON, ORGAN_STOMACH, CTVolume
from .lesions import insert_lesions

#: Bump when rendering changes: cached renders of an older version are not reused.
RENDER_VERSION = "drr-3"

MU_WATER_PER_MM = 0.02  # about 60 keV effective energy


@dataclass
class DRR(Phantom):
    """A rendered radiograph and its truth; ``truth()`` and ``zones()`` as for phantoms."""

    view: str = "PA"
    lesion: str = "none"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderSettings:
    lung_field_fraction: float = 0.35
    lesion_threshold_mm: float = 5.0
    # Water-equivalent mm a lesion adds along the ray: 3 mm cut the primary beam by about 6 %
    # at 60 keV (MU_WATER_PER_MM), a contrast a reader sees against lung; -500 HU ground glass
    # in -870 HU lung must be about 8 mm thick to reach it, consolidation about 3.5 mm.
    lesion_visible_mm: float = 3.0
    abdomen_threshold_mm: float = 8.0
    p_normal: float = 0.35
    p_ap: float = 0.4
    min_size: int = 256
    max_size: int = 320


# -- deformation -----------------------------------------------------------


def split_lungs(volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) lungs: cut at the sagittal plane with the fewest lung voxels between them."""
    per_x = volume.lungs.sum(axis=(1, 2)).astype(np.float64)
    xs = np.flatnonzero(per_x)
    lo, hi = xs[0] + (xs[-1] - xs[0]) // 4, xs[-1] - (xs[-1] - xs[0]) // 4
    cut = lo + int(np.argmin(per_x[lo : hi + 1]))
    right = volume.lungs.copy()
    right[cut:] = False  # axis 0 runs toward the patient's left
    return right, volume.lungs & ~right


def body_box(volume: CTVolume) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre and half-extent (mm, x and y, about the grid centre) of the patient's body."""
    s = volume.spacing_mm
    body = volume.hu > -900
    centre, half = [], []
    for axis, other in ((0, (1, 2)), (1, (0, 2))):
        idx = np.flatnonzero(body.any(axis=other))
        n = volume.shape[axis]
        centre.append(((idx[0] + idx[-1]) / 2 - (n - 1) / 2) * s)
        half.append((idx[-1] - idx[0] + 1) * s / 2 + 5.0)
    return (centre[0], centre[1]), (half[0], half[1])


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def deform(
    rng: np.random.Generator, volume: CTVolume, right: np.ndarray, left: np.ndarray, params: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Warped (HU, right lung, left lung, organ codes or None) on a grid over the body's box, 18 % larger in x and y."""
    s = volume.spacing_mm
    nx, ny, nz = volume.shape
    # Warp only the body's box (plus room to grow): the air around it costs time and adds nothing.
    origin, half = body_box(volume)
    out_shape = (int(2 * half[0] * 1.18 / s), int(2 * half[1] * 1.18 / s), nz)
    size = rng.uniform(0.88, 1.12)  # patient size
    scale = size * np.array([rng.uniform(0.9, 1.1), rng.uniform(0.88, 1.12), rng.uniform(0.9, 1.1)])
    angles = np.radians([rng.uniform(-5, 5), rng.uniform(-4, 4), rng.uniform(-6, 6)])
    inverse = np.linalg.inv(_rotation(*angles) @ np.diag(scale))
    params.update(size=size, scale=scale.round(3).tolist(), angles_deg=np.degrees(angles).round(2).tolist())

    # Output voxel centres in mm about the body's centre.
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in out_shape]
    gx, gy, gz = torch.meshgrid(*[a * s for a in axes], indexing="ij")
    p = torch.stack([gx, gy, gz], dim=-1)
    offset = torch.tensor([origin[0], origin[1], 0.0], dtype=torch.float32)
    q = p @ torch.from_numpy(inverse.T.astype(np.float32)) + offset
    # Smooth elastic displacement, a few cm wavelength, up to about a centimetre.
    amplitude = rng.uniform(3.0, 9.0)
    coarse = torch.from_numpy(rng.standard_normal((1, 3, 5, 5, 5)).astype(np.float32)) * amplitude
    q = q + F.interpolate(coarse, size=out_shape, mode="trilinear", align_corners=True)[0].permute(1, 2, 3, 0)
    # Inspiration: move the lower thorax down (deeper breath) or up, each side a little differently.
    zs = np.flatnonzero(volume.lungs.any(axis=(0, 1)))
    base = (zs[0] - (nz - 1) / 2) * s
    view = params["view"]
    shift = rng.uniform(-22.0, 16.0) * (1.0 if view == "PA" else 0.6) - (6.0 if view == "AP" else 0.0)
    tilt = rng.uniform(-0.4, 0.4)  # the two domes move differently: their heights vary between people
    bump = torch.exp(-(((gz - base - 30.0) / 70.0) ** 2)) * (1.0 + tilt * torch.tanh(gx / 60.0))
    q[..., 2] += shift * bump
    params.update(elastic_mm=round(amplitude, 2), inspiration_mm=round(shift, 2))

    # Normalised sampling coordinates; z is clamped so the neck and abdomen are
    # continued rather than cut off by the end of the scan.
    extent = torch.tensor([nx * s / 2, ny * s / 2, nz * s / 2], dtype=torch.float32)
    norm = q / extent
    norm[..., 2] = norm[..., 2].clamp(-1 + 1 / nz, 1 - 1 / nz)
    grid = norm[..., [2, 1, 0]][None]  # grid_sample wants (z, y, x) for a (X, Y, Z) volume
    layers: list[np.ndarray] = [volume.hu + 1000.0, right, left]
    codes = sorted(int(c) for c in np.unique(volume.organs) if c) if volume.organs is not None else []
    layers += [np.asarray(volume.organs == c) for c in codes]
    channels = torch.from_numpy(np.stack(layers).astype(np.float32))[None]
    warped = F.grid_sample(channels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0].numpy()
    hu = warped[0] - 1000.0
    organs = None
    if codes:
        organs = np.zeros(hu.shape, dtype=np.uint8)
        for i, c in enumerate(codes):
            organs[warped[3 + i] > 0.5] = c
    return hu, warped[1] > 0.5, warped[2] > 0.5, organs


# -- gas below the diaphragm -----------------------------------------------


def _top_share(values: np.ndarray, share: float) -> float:
    """The level above which ``share`` of ``values`` lie."""
    return float(np.quantile(values, 1.0 - share))


def fundus_bubble(rng: np.random.Generator, left: np.ndarray, spacing: float) -> np.ndarray:
    """A gas cap right under the left dome: its roof follows the dome, its floor is flat (air-fluid level)."""
    from .lesions import smooth_noise

    nz = left.shape[2]
    zs = np.flatnonzero(left.any(axis=(0, 1)))
    if zs.size < 2:
        return np.zeros(left.shape, dtype=bool)
    lowest = np.where(left.any(axis=2), np.argmax(left, axis=2), nz)  # lowest lung voxel per column (z runs up)
    # Columns whose lung ends in the lower quarter: the dome. Higher ends sit on the heart or the aortic arch.
    base = lowest <= zs[0] + 0.25 * (zs[-1] - zs[0])
    if base.sum() < 20:
        return np.zeros(left.shape, dtype=bool)
    xs = np.flatnonzero(base.any(axis=1))
    cx = xs[0] + rng.uniform(0.25, 0.8) * (xs[-1] - xs[0])  # axis 0 runs to the patient's left: lateral is high x
    ys = np.flatnonzero(base[int(round(cx))])
    cy = ys[0] + rng.uniform(0.3, 0.75) * (ys[-1] - ys[0]) if ys.size else (base.shape[1] - 1) / 2
    rx, ry = rng.uniform(15, 45) / spacing, rng.uniform(15, 40) / spacing
    x, y = np.meshgrid(np.arange(left.shape[0]), np.arange(left.shape[1]), indexing="ij")
    wobble = 0.3 * smooth_noise(rng, base.shape, 6)
    footprint = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0 + wobble) & base
    if not footprint.any():
        return np.zeros(left.shape, dtype=bool)
    gap = rng.uniform(4.0, 10.0) / spacing  # diaphragm and gastric wall
    roof = lowest - gap
    floor = float(roof[footprint].max()) - rng.uniform(10.0, 40.0) / spacing
    z = np.arange(nz)[None, None, :]
    return footprint[..., None] & (z <= roof[..., None]) & (z >= floor) & (z >= 3)


def add_gas(
    rng: np.random.Generator, hu: np.ndarray, left: np.ndarray, organs: np.ndarray | None,
    spacing: float, params: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """(HU with gas pockets, abdomen mask) of a deformed volume.

    Erect films (most PA, some AP) show the stomach's gas as a cap above an
    air-fluid level under the left dome; supine ones show it anteriorly.
    The lowest slices get no new gas: the projector repeats the last slice
    to continue the abdomen, which would draw a pocket there as a column.
    """
    from .lesions import smooth_noise

    hu = hu.copy()
    erect = rng.random() < (0.85 if params["view"] == "PA" else 0.35)
    abdomen = organs > 0 if organs is not None else np.zeros(hu.shape, dtype=bool)
    z = np.arange(hu.shape[2])[None, None, :]
    gas = np.zeros(hu.shape, dtype=bool)
    if organs is not None and (organs == ORGAN_STOMACH).sum() > 20:
        stomach = organs == ORGAN_STOMACH
        share = rng.uniform(0.08, 0.5) if rng.random() < 0.85 else 0.0  # sometimes collapsed, no bubble
        if erect:
            hu[stomach & (hu < -300)] = rng.uniform(0.0, 40.0)  # the supine gas has risen: fluid stays
            zz = np.broadcast_to(z, hu.shape)[stomach]
            if share:
                gas |= stomach & (z >= _top_share(zz, share))
        elif share:
            y = np.arange(hu.shape[1])[None, :, None]
            gas |= stomach & (y >= _top_share(np.broadcast_to(y, hu.shape)[stomach], share))
    if organs is not None and (organs == ORGAN_COLON).sum() > 20 and rng.random() < 0.85:
        colon = organs == ORGAN_COLON
        field = smooth_noise(rng, hu.shape, int(rng.integers(8, 20)))
        if erect:
            field = field + 1.5 * z / hu.shape[2]  # gas rises to the flexures
        gas |= colon & (field >= _top_share(field[colon], rng.uniform(0.05, 0.5)))
    bubble = np.zeros(hu.shape, dtype=bool)
    if rng.random() < (0.75 if erect else 0.35):
        bubble = fundus_bubble(rng, left, spacing)
    gas = (gas | bubble) & (z >= 3)
    hu[gas] = rng.uniform(-1000.0, -950.0)
    params.update(erect=erect, gas_ml=round(float(gas.sum()) * spacing**3 / 1000.0, 1),
                  fundus_bubble_ml=round(float(bubble.sum()) * spacing**3 / 1000.0, 1))
    return hu, abdomen | bubble


# -- attenuation and projection --------------------------------------------


def attenuation(rng: np.random.Generator, hu: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Linear attenuation per mm: water-scaled density, bone weighted like a lower kVp."""
    bone_weight = rng.uniform(1.3, 2.4)  # photoelectric share of bone: high at 60 kVp, lower at 120
    bone_density = rng.uniform(0.8, 1.2)  # thinner / denser ribs and spine
    soft_density = rng.uniform(0.93, 1.07)
    params.update(bone_weight=round(bone_weight, 3), bone_density=round(bone_density, 3))
    density = np.clip((hu + 1000.0) / 1000.0, 0.0, None)
    bone = np.clip((hu - 150.0) / 1000.0, 0.0, None)
    soft = np.clip(density, 0.0, 1.1) * soft_density
    return (MU_WATER_PER_MM * (soft + bone * bone_density * bone_weight)).astype(np.float32)


def project(
    channels: np.ndarray, spacing: float, geometry: dict[str, Any], shape: tuple[int, int], chunk: int = 24
) -> np.ndarray:
    """Cone-beam line integrals (per mm of path) of (C, X, Y, Z) channels onto an (H, W) detector.

    Slices along axis 1 (posterior -> anterior) are magnified by SID / d
    about the central ray, d being the slice's distance from the source.
    """
    c, nx, ny, nz = channels.shape
    h, w = shape
    sid, sod, px = geometry["sid"], geometry["sod"], geometry["pixel_mm"]
    cx, cy, cz = geometry["centre_mm"]
    u = (torch.arange(w, dtype=torch.float32) + 0.5 - w / 2) * px
    v = (torch.arange(h, dtype=torch.float32) + 0.5 - h / 2) * px
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    obliquity = torch.sqrt(1.0 + (uu**2 + vv**2) / sid**2)
    ys = (np.arange(ny) - (ny - 1) / 2) * spacing
    # PA: the source is posterior (low y); AP: anterior.
    dist = sod + (ys - cy) if geometry["view"] == "PA" else sod - (ys - cy)
    vol = torch.from_numpy(np.ascontiguousarray(channels.transpose(2, 0, 1, 3)))  # (Y, C, X, Z)
    total = torch.zeros((c, h, w), dtype=torch.float32)
    for start in range(0, ny, chunk):
        idx = np.arange(start, min(ny, start + chunk))
        mag = torch.from_numpy((sid / dist[idx]).astype(np.float32))[:, None, None]
        x = cx + uu[None] / mag  # mm, column -> toward the patient's left
        z = cz - vv[None] / mag  # mm, row -> inferior
        gx = x / (nx * spacing / 2)
        gz = (z / (nz * spacing / 2)).clamp(-1 + 1 / nz, 1 - 1 / nz)
        grid = torch.stack([gz, gx], dim=-1)  # grid_sample: (W = Z, H = X)
        sampled = F.grid_sample(vol[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        total += sampled.sum(0)
    return (total * spacing * obliquity).numpy()


def sample_geometry(
    rng: np.random.Generator, volume: CTVolume, lungs: np.ndarray, view: str, settings: RenderSettings
) -> tuple[dict[str, Any], tuple[int, int]]:
    """Source distances, framing and detector size for one view."""
    s = volume.spacing_mm
    nx, ny, nz = lungs.shape
    xs, ys, zs = (np.flatnonzero(lungs.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    centre = [((a[0] + a[-1]) / 2 - (n - 1) / 2) * s for a, n in zip((xs, ys, zs), (nx, ny, nz))]
    lung_height = (zs[-1] - zs[0]) * s
    sid = rng.uniform(1500, 1900) if view == "PA" else rng.uniform(1000, 1300)
    oid = rng.uniform(110, 170)  # lung centre to detector
    mag = sid / (sid - oid)
    h = int(rng.integers(settings.min_size, settings.max_size + 1))
    w = int(round(h * rng.uniform(0.85, 1.15)))
    fill = rng.uniform(0.58, 0.78)  # share of the image height the lungs take
    pixel = lung_height * mag / fill / h
    centre = [centre[0] + rng.uniform(-15, 15), centre[1], centre[2] + rng.uniform(-25, 15)]
    geometry = {"view": view, "sid": sid, "sod": sid - oid, "pixel_mm": pixel, "centre_mm": centre}
    return geometry, (h, w)


# -- detector --------------------------------------------------------------


def expose(rng: np.random.Generator, line_integral: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Primary + scatter, log, tone curve, blur, noise -> [0, 1] MONOCHROME2."""
    h = line_integral.shape[0]
    primary = np.exp(-line_integral)
    scatter_fraction = rng.uniform(0.05, 0.6)
    scatter = cv2.GaussianBlur(primary, (0, 0), sigmaX=rng.uniform(0.06, 0.15) * h)
    detected = -np.log(primary + scatter_fraction * scatter + 1e-4)
    lo, hi = np.percentile(detected, [rng.uniform(0.5, 3.0), rng.uniform(99.0, 99.9)])
    image = np.clip((detected - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if rng.random() < 0.5:
        image = image ** rng.uniform(0.6, 1.6)
    else:  # film-like S curve
        k, c = rng.uniform(3.0, 7.0), rng.uniform(0.35, 0.65)
        lo_v, hi_v = 1 / (1 + math.exp(k * c)), 1 / (1 + math.exp(-k * (1 - c)))
        image = (1 / (1 + np.exp(-k * (image - c))) - lo_v) / (hi_v - lo_v)
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=rng.uniform(0.3, 1.3))
    noise = rng.uniform(0.005, 0.03)
    image = image + noise * (0.5 + image) * rng.standard_normal(image.shape).astype(np.float32)
    image = (image - 0.5) * rng.uniform(0.85, 1.1) + 0.5 + rng.uniform(-0.06, 0.06)
    params.update(scatter=round(scatter_fraction, 3), noise=round(noise, 4))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def collimate(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Shutter borders: unexposed (bright) or blanked by the console (black)."""
    if rng.random() < 0.4:
        return image
    h, w = image.shape
    value = 1.0 if rng.random() < 0.6 else 0.0
    out = image.copy()
    for side in range(4):
        if rng.random() < 0.6:
            depth = int(rng.uniform(0.01, 0.07) * (h if side < 2 else w))
            band = (slice(0, depth), slice(None)) if side == 0 else (slice(h - depth, h), slice(None)) if side == 1 \
                else (slice(None), slice(0, depth)) if side == 2 else (slice(None), slice(w - depth, w))
            out[band] = value - (0.1 * rng.random() if value else -0.05 * rng.random())
    return out


def burn_in(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """An "L"/"R" side marker and sometimes a line of text, burned in as bright pixels."""
    h, w = image.shape
    ink = np.zeros((h, w), dtype=np.uint8)  # OpenCV draws text on 8-bit images only
    if rng.random() < 0.8:
        letter = "R" if rng.random() < 0.5 else "L"
        x = int(rng.uniform(0.03, 0.2) * w) if letter == "R" else int(rng.uniform(0.75, 0.9) * w)
        y = int(rng.uniform(0.08, 0.25) * h)
        scale = rng.uniform(0.6, 1.3) * h / 320
        cv2.putText(ink, letter, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, int(rng.integers(215, 256)),
                    max(1, int(2 * scale)), cv2.LINE_AA)
    if rng.random() < 0.5:
        text = str(rng.choice(["PA ERECT", "AP PORTABLE", "SUPINE", "CHEST", "INSP"]))
        if rng.random() < 0.5:
            text += f" {int(rng.integers(1, 28)):02d}/{int(rng.integers(1, 13)):02d}"
        y = int(rng.uniform(0.03, 0.1) * h) if rng.random() < 0.5 else int(rng.uniform(0.92, 0.98) * h)
        cv2.putText(ink, text, (int(rng.uniform(0.02, 0.4) * w), y), cv2.FONT_HERSHEY_PLAIN,
                    rng.uniform(0.7, 1.2) * h / 320, 255, 1, cv2.LINE_AA)
    return np.maximum(image, ink.astype(np.float32) / 255.0)


# -- truth -----------------------------------------------------------------


def lung_field(path_mm: np.ndarray, fraction: float) -> np.ndarray:
    """Pixels where the ray crosses at least ``fraction`` of the lung's typical path length."""
    inside = path_mm > 0.5
    if not inside.any():
        return inside
    typical = float(np.percentile(path_mm[inside], 95))
    mask = path_mm >= fraction * typical
    # Keep the largest blob: the thin lung behind the heart and below the domes leaves islands.
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = labels == biggest
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)


def below_domes(abdomen_mm: np.ndarray, threshold_mm: float) -> np.ndarray:
    """Pixels at and below the first row of each column whose ray crosses abdomen: never lung field."""
    hit = abdomen_mm > threshold_mm
    return np.maximum.accumulate(hit, axis=0)


def visible_opacity(lesion_mm: np.ndarray, added_mm: np.ndarray, settings: RenderSettings) -> np.ndarray:
    """Where the projected lesion is both thick enough and dense enough to show on a film."""
    return (lesion_mm > settings.lesion_threshold_mm) & (added_mm >= settings.lesion_visible_mm)


def _separate(right: np.ndarray, left: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the two lungs overlap in projection (the anterior junction), keep a gap."""
    overlap = cv2.dilate((right & left).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return right & ~overlap, left & ~overlap


def _remove_specks(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


# -- one radiograph --------------------------------------------------------


def render(
    volume: CTVolume, seed: int, settings: RenderSettings | None = None,
    sides: tuple[np.ndarray, np.ndarray] | None = None,
) -> DRR:
    """Draw DRR ``seed`` of ``volume``: the same seed always gives the same radiograph."""
    settings = settings or RenderSettings()
    rng = np.random.default_rng(seed)
    right3, left3 = sides if sides is not None else split_lungs(volume)
    view = "AP" if rng.random() < settings.p_ap else "PA"
    params: dict[str, Any] = {"view": view}
    hu, right, left, organs = deform(rng, volume, right3, left3, params)
    # Its own stream: whether a volume names its organs changes nothing else in the render.
    gas_rng = np.random.default_rng(int(rng.integers(2**63)))
    hu, abdomen = add_gas(gas_rng, hu, left, organs, volume.spacing_mm, params)
    lesions = insert_lesions(rng, hu, right, left, settings.p_normal)
    added = np.clip((lesions.hu - hu) / 1000.0, 0.0, None)  # water-equivalent density the lesion adds
    params.update(lesion=lesions.kind, lesion_sides=list(lesions.sides), lesion_fraction=round(lesions.fraction, 3))
    mu = attenuation(rng, lesions.hu, params)
    geometry, shape = sample_geometry(rng, volume, right | left, view, settings)
    params.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in geometry.items() if k != "view"})
    stack = np.stack([mu, right, left, lesions.membership, abdomen, added]).astype(np.float32)
    line, right_mm, left_mm, lesion_mm, abdomen_mm, added_mm = project(stack, volume.spacing_mm, geometry, shape)

    under = below_domes(abdomen_mm, settings.abdomen_threshold_mm)
    min_pixels = max(4, int(0.0005 * shape[0] * shape[1]))
    right_field = _remove_specks(lung_field(right_mm, settings.lung_field_fraction) & ~under, min_pixels)
    left_field = _remove_specks(lung_field(left_mm, settings.lung_field_fraction) & ~under, min_pixels)
    right_field, left_field = _separate(right_field, left_field)
    lungs = right_field | left_field
    disease = _remove_specks(visible_opacity(lesion_mm, added_mm, settings) & lungs, min_pixels)

    image = burn_in(rng, collimate(rng, expose(rng, line, params)))
    mag = geometry["sid"] / geometry["sod"]
    return DRR(
        seed=seed, image=image, right_lung=right_field, left_lung=left_field, disease=disease,
        affected_zones=(), pixel_spacing_mm=geometry["pixel_mm"] / mag,
        view=view, lesion=lesions.kind if disease.any() else "none", params=params,
    )
