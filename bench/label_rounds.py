"""Rounds the device engine's component labelling takes to settle, by blob shape and map size.

    python bench/label_rounds.py [--sizes 256 512] [--json PATH]

``inference.lung_blobs_on_device`` labels Stage I's cleaned lung maps with
:func:`cxrtriage.inference.device_ops.label_components`; a labelling that has
not settled after ``MAX_LABEL_ROUNDS`` sends its batch to the host threads.
For lung-like ellipses, a crescent, a serpentine and blobby noise, this prints
how many rounds settle the labelling:

* ``node``: the node's labelling, rounds counted through its convergence checks
  (so a multiple of ``_ROUNDS_PER_CHECK``, the first check that saw no change);
* ``minimum only``: the rule before 4d40f54 (a 3 x 3 minimum and one pointer jump a
  round, no hooking), run here round by round up to 4096.

Both give each component the label of its first pixel in raster order; the
script checks the node's labels against scipy's components. No device is needed:
the number of rounds does not depend on where the operations run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrtriage.inference import device_ops  # noqa: E402


def shapes(size: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:size, :size] * (512 / size)
    r = np.hypot(yy - 256, xx - 256)
    serpentine = np.zeros((size, size), bool)
    band, step = round(25 * size / 512), round(55 * size / 512)
    for k in range(8):
        top = round((40 + k * 55) * size / 512)
        serpentine[top:top + band, round(30 * size / 512):round(480 * size / 512)] = True
        column = round((455 if k % 2 == 0 else 30) * size / 512)
        serpentine[top:top + step + band, column:column + band] = True
    noise = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((size, size)), size / 60)
    return {
        "two lung-like ellipses": (((yy - 260) / 190) ** 2 + ((xx - 150) / 80) ** 2 < 1)
        | (((yy - 260) / 190) ** 2 + ((xx - 360) / 80) ** 2 < 1),
        "crescent": (r < 200) & (r > 150) & ~((yy < 256) & (xx < 256)),
        "serpentine": serpentine,
        "blobby noise (tens of blobs)": noise > np.quantile(noise, 0.6),
    }


def minimum_only_rounds(mask: torch.Tensor, cap: int = 4096) -> int | None:
    """Rounds of the rule before 4d40f54: a 3 x 3 minimum, then one pointer jump."""
    n, h, w = mask.shape
    outside = float(h * w)
    labels = torch.where(mask, torch.arange(h * w, dtype=torch.float32).view(1, h, w), outside)
    for rounds in range(1, cap + 1):
        before = labels
        labels = torch.where(mask, -F.max_pool2d(-labels[:, None], 3, stride=1, padding=1)[:, 0], outside)
        flat = labels.view(n, -1)
        labels = torch.where(mask, flat.gather(1, flat.long().clamp(max=h * w - 1)).view(n, h, w), outside)
        if not (labels != before).any():
            return rounds
    return None


def node_rounds(mask: torch.Tensor) -> tuple[int | None, bool]:
    """(rounds, whether its labels are scipy's components numbered by their first pixel)."""
    checks = 0
    on_host = device_ops._on_host

    def counted(flag: torch.Tensor) -> bool:
        nonlocal checks
        checks += 1
        return on_host(flag)

    device_ops._on_host = counted
    try:
        labels = device_ops.label_components(mask)
    finally:
        device_ops._on_host = on_host
    if labels is None:
        return None, False
    m = mask[0].numpy()
    components, k = ndimage.label(m, structure=np.ones((3, 3)))
    first = np.full(k + 1, m.size)
    np.minimum.at(first, components.ravel(), np.arange(m.size))
    want = np.where(m, first[components], m.size)
    return checks * device_ops._ROUNDS_PER_CHECK, bool(np.array_equal(labels[0].numpy(), want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    print(f"MAX_LABEL_ROUNDS {device_ops.MAX_LABEL_ROUNDS}; rounds to settle (node: to the first quiet check)")
    for size in args.sizes:
        for name, mask in shapes(size).items():
            t = torch.from_numpy(mask)[None]
            rounds, same = node_rounds(t)
            row = {"size": size, "shape": name, "node": rounds, "node_labels_are_scipys": same,
                   "minimum_only": minimum_only_rounds(t)}
            rows.append(row)
            print(f"{size:4d} px  {name:30s} node {row['node']!s:>5}  minimum only {row['minimum_only']!s:>5}"
                  f"  {'labels as scipy' if same else 'LABELS DIFFER'}")
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "max_label_rounds": device_ops.MAX_LABEL_ROUNDS,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
