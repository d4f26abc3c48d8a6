"""The device engine's host step between the networks: each image's lung blobs at model resolution.

    python bench/lung_blobs.py [--sizes 256 512] [--images 64] [--threads 1 2] [--rounds 3] [--json PATH]

For each model resolution (256: the bundled Stage I; 512: the paper's), on lung-shaped probability maps
(two blurred ellipses and noise, as a trained Stage I gives):

* ``model_blobs``: ms an image of :func:`cxrtriage.inference.pipeline.model_blobs` (opening, closing,
  small-blob removal, the two largest components), wall and CPU (median of alternating rounds), on 1 and
  more threads of a pool (as :class:`~cxrtriage.inference.engine.DeviceStages` runs them);
* ``planes``: ms a batch of 32 to write two blob planes per image into a new array (fresh pages) and into
  a reused one (what the engine does since a5fc633).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrtriage.inference.pipeline import model_blobs  # noqa: E402

THRESHOLD, MIN_FRACTION = 0.5, 0.01


def lung_probabilities(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.zeros((size, size), np.float32)
    for centre in (size // 3, 2 * size // 3):
        axes = (size // 8 + int(rng.integers(0, size // 40 + 1)), size // 4 + int(rng.integers(0, size // 40 + 1)))
        cv2.ellipse(p, (centre, size // 2), axes, 0, 0, 360, 0.95, -1)
    return cv2.GaussianBlur(p, (0, 0), size / 100) + rng.random((size, size), dtype=np.float32) * 0.05


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_blobs(probs: list[np.ndarray], threads: int) -> dict[str, float]:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: model_blobs(p, THRESHOLD, MIN_FRACTION), probs[:threads]))  # warm
        c0, t0 = cpu_now(), time.perf_counter()
        kept = list(pool.map(lambda p: model_blobs(p, THRESHOLD, MIN_FRACTION), probs))
        wall, cpu = time.perf_counter() - t0, cpu_now() - c0
    assert all(len(k) == 2 for k in kept), "each map should give two lungs"
    return {"wall_ms_per_image": round(wall * 1000 / len(probs), 3),
            "cpu_ms_per_image": round(cpu * 1000 / len(probs), 3)}


def time_planes(blobs: list[list[np.ndarray]], size: int, rounds: int = 5) -> dict[str, float]:
    def fill(planes: np.ndarray) -> None:
        for j, kept in enumerate(blobs):
            for k in range(planes.shape[1]):
                planes[j, k] = kept[k] if k < len(kept) else 0.0

    shape = (len(blobs), 2, size, size)
    fresh, reused = [], []
    buffer = np.empty(shape, np.float32)
    fill(buffer)  # its pages are in from now on
    for _ in range(rounds):  # alternating
        t0 = time.perf_counter()
        fill(np.zeros(shape, np.float32))
        fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fill(buffer)
        reused.append(time.perf_counter() - t0)
    return {"new_array_ms_per_batch": round(sorted(fresh)[rounds // 2] * 1000, 2),
            "reused_ms_per_batch": round(sorted(reused)[rounds // 2] * 1000, 2), "batch": len(blobs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as in a worker or an engine thread: one image per thread
    report: dict[str, Any] = {}
    for size in args.sizes:
        probs = [lung_probabilities(size, seed) for seed in range(args.images)]
        rounds: dict[str, list[dict[str, float]]] = {f"model_blobs_{n}_threads": [] for n in args.threads}
        for _ in range(args.rounds):  # alternating, every round kept
            for n in args.threads:
                rounds[f"model_blobs_{n}_threads"].append(time_blobs(probs, n))
        row: dict[str, Any] = {key: {"rounds": runs, "median_wall_ms_per_image": statistics.median(
            r["wall_ms_per_image"] for r in runs), "median_cpu_ms_per_image": statistics.median(
            r["cpu_ms_per_image"] for r in runs)} for key, runs in rounds.items()}
        row["planes"] = time_planes([model_blobs(p, THRESHOLD, MIN_FRACTION) for p in probs[:32]], size)
        report[str(size)] = row
        print(size, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
