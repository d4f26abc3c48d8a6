"""Image preparation shared by inference and training.

Both stages see images prepared by these functions, at training time and at
inference time alike, so the crop of Stage II is built the same way from the
true lung mask (training) and the predicted one (inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def resize(image: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize an (H, W) array to ``size`` = (height, width).

    Area averaging when shrinking (no aliasing from 2500-pixel detectors),
    bilinear when enlarging, nearest for label masks.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    if nearest:
        interp = cv2.INTER_NEAREST
    elif h < image.shape[0] and w < image.shape[1]:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_LINEAR
    src = image.astype(np.uint8) if image.dtype == bool else image
    out = cv2.resize(src, (w, h), interpolation=interp)
    return out.astype(bool) if image.dtype == bool else out


def equalize(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a [0, 1] image, back in [0, 1].

    Maps intensity to rank, so detectors, exposures and the synthetic
    phantoms end up with comparable histograms: lungs are the darkest third
    of a chest image whatever the absolute grey level.
    """
    as_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.equalizeHist(as_u8).astype(np.float32) / 255.0


def normalise(image: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(H, W) float in [0, 1] -> (C, H, W) float32 normalised per channel."""
    channels = len(mean)
    stack = np.repeat(image[None, :, :].astype(np.float32), channels, axis=0)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return (stack - m) / s


@dataclass(frozen=True)
class CropBox:
    """Rows ``top:bottom`` and columns ``left:right`` of the source image."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left

    def take(self, array: np.ndarray) -> np.ndarray:
        return array[self.top : self.bottom, self.left : self.right]

    def paste(self, patch: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Place a crop-sized patch back into a zero canvas of ``shape``."""
        canvas = np.zeros(shape, dtype=patch.dtype)
        canvas[self.top : self.bottom, self.left : self.right] = patch
        return canvas


def lung_box(lung_mask: np.ndarray, margin: float = 0.02) -> CropBox:
    """Bounding box of all lung pixels plus ``margin`` of the image size.

    With an empty mask, the whole image (Stage II then sees what Stage I saw).
    """
    h, w = lung_mask.shape
    rows = np.flatnonzero(lung_mask.any(axis=1))
    cols = np.flatnonzero(lung_mask.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return CropBox(0, h, 0, w)
    my, mx = int(round(margin * h)), int(round(margin * w))
    return CropBox(
        top=max(0, int(rows[0]) - my),
        bottom=min(h, int(rows[-1]) + 1 + my),
        left=max(0, int(cols[0]) - mx),
        right=min(w, int(cols[-1]) + 1 + mx),
    )


def masked_lung_crop(image: np.ndarray, lung_mask: np.ndarray, box: CropBox) -> np.ndarray:
    """Image with everything outside the lungs set to 0, cropped to ``box``.

    This is Danilov et al.'s "single crop": the lung mask applied as a
    bitwise AND, then the union bounding box.
    """
    return box.take(np.where(lung_mask, image, 0.0).astype(np.float32))
