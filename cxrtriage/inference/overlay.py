"""An overlay PNG a person can look at: lungs, zones with their scores, opacity."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .pipeline import Result
from .scoring import BRIXIA_LETTERS

LUNG_COLOUR = (255, 255, 0)  # cyan (BGR)
ZONE_COLOUR = (0, 215, 255)  # amber
OPACITY_COLOUR = (0, 0, 255)  # red


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(found)


def render_overlay(pixels: np.ndarray, result: Result, max_side: int = 1024) -> np.ndarray:
    """BGR uint8 image: opacity tinted red, lung outlines, zone outlines and labels."""
    scale = min(1.0, max_side / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))

    def small(mask: np.ndarray) -> np.ndarray:
        return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)

    grey = cv2.resize(np.clip(pixels * 255, 0, 255).astype(np.uint8), size, interpolation=cv2.INTER_AREA)
    canvas = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    disease = small(result.disease)
    tint = canvas.copy()
    tint[disease] = OPACITY_COLOUR
    canvas = cv2.addWeighted(tint, 0.45, canvas, 0.55, 0)
    thickness = max(1, round(2 * size[0] / 1024))
    font_scale = 0.45 * size[0] / 1024 + 0.15
    for k, zone in enumerate(result.zones.zones):
        zone_small = small(zone)
        cv2.drawContours(canvas, _contours(zone_small), -1, ZONE_COLOUR, 1)
        ys, xs = np.nonzero(zone_small)
        if xs.size == 0:
            continue
        label = f"{BRIXIA_LETTERS[k]} {100 * result.scores.fractions[k]:.0f}% s{result.scores.binary[k]} g{result.scores.brixia[k]}"
        org = (int(xs.mean()) - int(40 * font_scale), int(ys.mean()))
        cv2.putText(canvas, label, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(canvas, label, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thickness, cv2.LINE_AA)
    for lung in (result.zones.right, result.zones.left):
        cv2.drawContours(canvas, _contours(small(lung)), -1, LUNG_COLOUR, thickness)
    s = result.scores
    header = f"score {s.total}/6  Brixia-style {s.brixia_total}/18  P(disease) {result.p_disease:.2f}  (R = patient right)"
    cv2.rectangle(canvas, (0, 0), (size[0], int(28 * font_scale * 2)), (0, 0, 0), -1)
    cv2.putText(canvas, header, (8, int(20 * font_scale * 2)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return canvas


def write_overlay(path: str | Path, pixels: np.ndarray, result: Result) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), render_overlay(pixels, result)):
        raise OSError(f"cannot write overlay {path}")
    return path
