"""Augmentations of Danilov et al. 2022, written with OpenCV, and a radiograph console's processing.

CLAHE, random-sized crop, rotation within +-15 degrees, horizontal flip and
brightness/contrast, applied identically to the image and its mask. Images
are float32 in [0, 1], masks boolean, all the same (H, W). Optionally
(``console``), the multi-scale processing a CR/DR console applies before a
film is shown (:func:`console_processing`), which neither the phantoms nor the
DRRs have.
"""

from __future__ import annotations

import cv2
import numpy as np


def clahe(image: np.ndarray, clip_limit: float = 2.0) -> np.ndarray:
    as_u8 = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    out = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(8, 8)).apply(as_u8)
    return out.astype(np.float32) / 255.0


def random_sized_crop(
    rng: np.random.Generator, image: np.ndarray, masks: list[np.ndarray], min_scale: float = 0.75
) -> tuple[np.ndarray, list[np.ndarray]]:
    h, w = image.shape
    ch = int(h * rng.uniform(min_scale, 1.0))
    cw = int(w * rng.uniform(min_scale, 1.0))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))

    def crop(a: np.ndarray, interp: int) -> np.ndarray:
        patch = a[top : top + ch, left : left + cw]
        src = patch.astype(np.uint8) if a.dtype == bool else patch
        out = cv2.resize(src, (w, h), interpolation=interp)
        return out.astype(bool) if a.dtype == bool else out

    return crop(image, cv2.INTER_LINEAR), [crop(m, cv2.INTER_NEAREST) for m in masks]


def rotate(
    image: np.ndarray, masks: list[np.ndarray], degrees: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)

    def warp(a: np.ndarray, interp: int) -> np.ndarray:
        src = a.astype(np.uint8) if a.dtype == bool else a
        out = cv2.warpAffine(src, matrix, (w, h), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out.astype(bool) if a.dtype == bool else out

    return warp(image, cv2.INTER_LINEAR), [warp(m, cv2.INTER_NEAREST) for m in masks]


def console_processing(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """What a CR/DR console does to a raw radiograph before it is displayed, drawn at random: large-scale
    contrast compressed (dynamic range compression: the lungs, mediastinum and upper abdomen brought
    closer in grey level) and fine detail enhanced (unsharp masking: sharper rib, vessel and diaphragm
    edges), then stretched to [0, 1] between the 0.5th and 99.5th percentiles.

    Multi-scale processing of this kind is standard on clinical consoles; the strengths here span mild
    to strong settings, scaled to the image size. Phantoms and DRRs come without it.
    """
    side = float(max(image.shape))
    low = cv2.GaussianBlur(image, (0, 0), sigmaX=rng.uniform(0.06, 0.2) * side)
    out = image - rng.uniform(0.2, 0.7) * (low - float(low.mean()))
    detail = out - cv2.GaussianBlur(out, (0, 0), sigmaX=rng.uniform(0.004, 0.02) * side)
    out = out + rng.uniform(0.3, 1.5) * detail
    lo, hi = np.percentile(out, (0.5, 99.5))
    return np.clip((out - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def augment(
    rng: np.random.Generator, image: np.ndarray, masks: list[np.ndarray], console: float = 0.0,
    equalized: bool = True,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One random draw of the training augmentations; with probability ``console`` the image first gets
    :func:`console_processing` (and, for a model fed equalised images, is equalised again, as the pipeline
    equalises what the console produced)."""
    if console and rng.random() < console:
        image = console_processing(rng, image)
        if equalized:
            from ..preprocess import equalize

            image = equalize(image)
    if rng.random() < 0.2:
        image = clahe(image)
    if rng.random() < 0.5:
        image, masks = random_sized_crop(rng, image, masks)
    if rng.random() < 0.5:
        image, masks = rotate(image, masks, float(rng.uniform(-15.0, 15.0)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
        masks = [m[:, ::-1] for m in masks]
    if rng.random() < 0.5:
        contrast = rng.uniform(0.8, 1.2)
        brightness = rng.uniform(-0.2, 0.2)
        image = np.clip((image - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    return np.ascontiguousarray(image, dtype=np.float32), [np.ascontiguousarray(m) for m in masks]
