"""Trace the hemidiaphragms on the real CR RG1 (pydicom-data) from the image alone: a test fixture.

usage: python bench/rg1_diaphragm.py [--json tests/rg1_diaphragm.json] [--image docs/model-card-rg1-diaphragm.jpg]

``tests/test_quality.py`` checks that the bundled lung masks stop at RG1's
diaphragm. Its first fixture was two rows read by eye on a whole-film view
(1475 and 1525 for the lowest lung points); enlarged crops show the lateral
costophrenic sulci running about 80 and 77 rows lower than that. This script
replaces that reading with a measurement that uses no model:

* in each lung's column range (given below, read off the crops: from the
  lateral chest wall to where the heart's border meets the dome), the dome is
  the smooth path of strongest dark-to-bright step going down (aerated lung
  above, diaphragm and liver or spleen below), found by dynamic programming
  over columns within a row band;
* the path's lowest row is the lowest point of that lung: the tip of the
  lateral costophrenic sulcus.

The ranges and bands are the only hand-given inputs; the image shows the traced
path on the film so that a reader can check it. RG1 is for evaluation only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import median_filter

#: (first column, last column, top row, bottom row) of the search, per lung; the patient's
#: right lung is on the image left. Columns run from the lateral chest wall's inner edge to
#: the cardiophrenic angle; the band holds the whole dome and the sulcus and nothing above.
SEARCH = {"right": (112, 620, 1380, 1640), "left": (1420, 1676, 1420, 1660)}
MAX_STEP = 5  # rows the path may move between neighbouring columns (the sulcus is steep)
MEDIAN_COLUMNS = 15


def rg1_pixels() -> np.ndarray:
    from pydicom.data import get_testdata_file

    from cxrtriage.inference.radiograph import load_dicom

    return load_dicom(Path(get_testdata_file("RG1_UNCR.dcm"))).pixels.astype(np.float32)


def trace(image: np.ndarray, first: int, last: int, top: int, bottom: int, max_step: int = MAX_STEP) -> np.ndarray:
    """Row of the dome in each column ``first..last``: the smooth path of strongest downward dark-to-bright step."""
    smooth = cv2.GaussianBlur(image, (0, 0), 3.0)
    step = smooth[top + 4 : bottom + 4, first : last + 1] - smooth[top - 4 : bottom - 4, first : last + 1]
    n_rows, n_cols = step.shape
    score = step[:, 0].copy()
    back = np.zeros((n_rows, n_cols), dtype=np.int64)
    rows = np.arange(n_rows)
    for c in range(1, n_cols):
        best = np.full(n_rows, -np.inf)
        arg = np.zeros(n_rows, dtype=np.int64)
        for d in range(-max_step, max_step + 1):
            src = np.clip(rows + d, 0, n_rows - 1)
            cand = score[src]
            better = cand > best
            best[better], arg[better] = cand[better], src[better]
        score, back[:, c] = best + step[:, c], arg
    path = np.zeros(n_cols, dtype=np.int64)
    path[-1] = int(np.argmax(score))
    for c in range(n_cols - 1, 0, -1):
        path[c - 1] = back[path[c], c]
    # A rib edge or a vessel crossing the dome pulls single columns off it: a running median drops such spikes.
    return median_filter(path, size=MEDIAN_COLUMNS, mode="nearest") + top


def draw(image: np.ndarray, domes: dict[str, np.ndarray], path: Path) -> None:
    """Both lungs' bases, enlarged, with the traced dome (green) and a row ruler."""
    panels = []
    for side, (first, last, top, bottom) in SEARCH.items():
        r0, r1, c0, c1 = top - 80, bottom + 20, max(0, first - 60), min(image.shape[1], last + 60)
        sub = image[r0:r1, c0:c1]
        lo, hi = np.percentile(sub, [1, 99])
        gray = (np.clip((sub - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
        panel = cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), None, fx=1.5, fy=1.5, interpolation=cv2.INTER_AREA)
        pts = np.stack([(np.arange(first, last + 1) - c0) * 1.5, (domes[side] - r0) * 1.5], axis=1)
        cv2.polylines(panel, [pts.astype(np.int32)], False, (0, 220, 0), 1, cv2.LINE_AA)
        for row in range((r0 // 50 + 1) * 50, r1, 50):
            y = int((row - r0) * 1.5)
            cv2.line(panel, (0, y), (14, y), (0, 200, 255), 2)
            cv2.putText(panel, str(row), (16, y + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 200, 255), 1, cv2.LINE_AA)
        label = f"patient {side}: lowest row {int(domes[side].max())}"
        cv2.putText(panel, label, (70, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 200, 255), 1, cv2.LINE_AA)
        panels.append(panel)
    height = max(p.shape[0] for p in panels)
    panels = [cv2.copyMakeBorder(p, 0, height - p.shape[0], 0, 6, cv2.BORDER_CONSTANT, value=(0, 0, 0)) for p in panels]
    cv2.imwrite(str(path), np.hstack(panels), [cv2.IMWRITE_JPEG_QUALITY, 85])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the fixture here")
    parser.add_argument("--image", type=Path, help="draw the traced domes here (.jpg or .png)")
    args = parser.parse_args()
    image = rg1_pixels()
    domes = {side: trace(image, *box) for side, box in SEARCH.items()}
    out = {
        "source": "RG1_UNCR.dcm (pydicom-data), 1955 x 1841; traced by bench/rg1_diaphragm.py, no model",
        "search": SEARCH,
        "max_step": MAX_STEP,
        "median_columns": MEDIAN_COLUMNS,
        "domes": {side: {"first_column": SEARCH[side][0], "rows": rows.tolist()} for side, rows in domes.items()},
        "lowest_row": {side: int(rows.max()) for side, rows in domes.items()},
        "lowest_column": {side: int(SEARCH[side][0] + np.argmax(rows)) for side, rows in domes.items()},
        "dome_top": {side: int(rows.min()) for side, rows in domes.items()},
    }
    for side in domes:
        print(f"{side}: dome top row {out['dome_top'][side]}, lowest row {out['lowest_row'][side]} "
              f"at column {out['lowest_column'][side]}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=None, separators=(",", ":")) + "\n")
    if args.image:
        draw(image, domes, args.image)


if __name__ == "__main__":
    main()
