"""An overlay PNG a person can look at: lungs, zones with their scores, opacity.

A footer names the models that produced it and, when they never saw a real
radiograph, carries the research-use notice in amber: the picture may be
shown on its own, so it has to say this itself.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .identity import RESEARCH_USE_NOTICE
from .pipeline import Result
from .scoring import BRIXIA_LETTERS

LUNG_COLOUR = (255, 255, 0)  # cyan (BGR)
ZONE_COLOUR = (0, 215, 255)  # amber
OPACITY_COLOUR = (0, 0, 255)  # red
NOTICE_COLOUR = (0, 191, 255)  # amber banner behind the research-use notice


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
        if xs.size == 0 or not result.scores.scored[k]:
            continue
        scores = result.scores
        label = f"{BRIXIA_LETTERS[k]} {100 * scores.fractions[k]:.0f}% s{scores.binary[k]} g{scores.brixia[k]}"
        org = (int(xs.mean()) - int(40 * font_scale), int(ys.mean()))
        cv2.putText(canvas, label, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(canvas, label, org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thickness, cv2.LINE_AA)
    for lung in (result.zones.right, result.zones.left):
        cv2.drawContours(canvas, _contours(small(lung)), -1, LUNG_COLOUR, thickness)
    s = result.scores
    header = [f"score {s.total}/{sum(s.scored)}  Brixia-style {s.brixia_total}/18  P(disease) {result.p_disease:.2f}"
              "  (R = patient right)"]
    if s.missing_lungs:
        header.append(f"{' and '.join(s.missing_lungs)} lung not found: its zones are unscored")
    line_height = int(28 * font_scale * 2)
    _banner(canvas, 0, header, (0, 0, 0), (255, 255, 255), font_scale, thickness, line_height)
    identity = result.identity
    footer = [f"{m.stage}: {m.name}" for m in (identity.lungs, identity.disease)]
    if identity.research_use:
        footer.insert(0, RESEARCH_USE_NOTICE.upper())
    colour = NOTICE_COLOUR if identity.research_use else (0, 0, 0)
    text = (0, 0, 0) if identity.research_use else (255, 255, 255)
    _banner(canvas, size[1] - line_height * len(footer), footer, colour, text, font_scale, thickness, line_height)
    return canvas


def _banner(canvas: np.ndarray, top: int, lines: list[str], background: tuple[int, int, int],
            colour: tuple[int, int, int], font_scale: float, thickness: int, line_height: int) -> None:
    """Lines of text on a filled band across the whole image, starting at row ``top``."""
    width = canvas.shape[1]
    cv2.rectangle(canvas, (0, top), (width, top + line_height * len(lines)), background, -1)
    for i, line in enumerate(lines):
        baseline = top + i * line_height + int(0.72 * line_height)
        cv2.putText(canvas, line, (8, baseline), cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, thickness, cv2.LINE_AA)


def write_overlay(path: str | Path, pixels: np.ndarray, result: Result) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), render_overlay(pixels, result)):
        raise OSError(f"cannot write overlay {path}")
    return path
