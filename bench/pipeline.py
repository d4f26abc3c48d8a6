"""Pipeline throughput: the published covid_scoring inference against cxrtriage, side by side.

    python bench/pipeline.py [--preset danilov2022] [--images 50] [--rounds 2] [--workers 2] [--json out.json]

The same synthetic 2500x2048 16-bit CRs go through

* ``covid_scoring``: the published inference re-implemented (bench/covid_scoring.py): batch 1,
  fp32, eager torch, cv2 resizing, per-image post-processing, then the same SEG + SR written
  one image after another;
* ``cxrtriage fp32`` and ``cxrtriage bf16``: ``cxrtriage.inference.parallel.ScoringPool``
  (worker processes, channels_last, full-resolution masks and scoring, SEG + SR written),
  in fp32 and with bf16 weights.

All read the DICOM files and write SEG + SR files; models are loaded before timing. Contenders
alternate within each round; medians, ratios against covid_scoring and the agreement of the
0-6 scores are printed. ``--preset danilov2022`` uses the paper's architectures and sizes
(DeepLabV3+/efficientnet-b1 @ 512, MA-Net/regnetx_064 @ 544) with untrained weights: its
speeds are the paper's; its weights are drawn once (seeded) and shared by all contenders, so the
agreement printed compares two implementations on the same (meaningless) masks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import torch

from covid_scoring import CovidScoringNet
from cxrtriage.config import InferenceSettings
from cxrtriage.inference.dicom_results import build_result_objects
from cxrtriage.inference.models import create_model
from cxrtriage.inference.parallel import ScoringPool
from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.inference.model_cache import ModelNotCached
from cxrtriage.inference.presets import PRESETS, model_specs
from cxrtriage.inference.radiograph import load_radiograph


def make_images(folder: Path, count: int, rows: int, cols: int) -> list[Path]:
    """Distinct phantoms drawn at a quarter size (drawing is slow at full size), enlarged."""
    generator = PhantomGenerator(rows // 4, cols // 4)
    files = []
    for i in range(count):
        phantom = generator(9_000_000 + i)
        image = cv2.resize(phantom.image, (cols, rows), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)
        files.append(write_cr(dataclasses.replace(phantom, image=image), folder / f"cr{i:03d}.dcm"))
    return files


def pin_untrained_weights(settings: InferenceSettings, folder: Path) -> InferenceSettings:
    """Give every process the same weights where the preset has none (danilov2022 here).

    Untrained models are initialised at random in each process; saved once
    (seeded) and loaded everywhere, the contenders run identical networks.
    """
    folder.mkdir(parents=True, exist_ok=True)
    overrides = {}
    try:
        specs = model_specs(settings)
    except ModelNotCached:  # the published files are not here: the architectures, without weights
        specs = PRESETS[settings.preset](need_weights=(False, False))
    for index, (name, spec) in enumerate(zip(("lungs", "disease"), specs)):
        if spec.weights:
            continue
        torch.manual_seed(index)
        path = folder / f"{name}-untrained.pth"
        torch.save(create_model(spec).state_dict(), path)
        overrides[name] = {**getattr(settings, name), "weights": str(path)}
    return settings.model_copy(update=overrides)


def run_reference(net: CovidScoringNet, files: list[Path], out: Path) -> list[list[int]]:
    zones = []
    for path in files:
        radiograph = load_radiograph(path)
        result = net.predict(radiograph)
        build_result_objects(radiograph.dataset, result).save(out)
        zones.append(result.scores.binary)
    return zones


def run_pool(pool: ScoringPool, files: list[Path], out: Path) -> list[list[int]]:
    zones = []
    for outcome in pool.map(files, out, dicom=True):
        if not outcome.ok:
            raise RuntimeError(f"{outcome.path}: {outcome.reason} {outcome.message}")
        zones.append([z["binary_score"] for z in outcome.result["zones"].values()])
    return zones


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    totals = [(sum(x), sum(y)) for x, y in zip(a, b)]
    return {
        "same_total": sum(x == y for x, y in totals),
        "total_mae": statistics.fmean(abs(x - y) for x, y in totals),
        "same_zone": sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / (6 * len(a)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bundled", choices=["bundled", "danilov2022"])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="cxrtriage images per model call")
    parser.add_argument("--size", default="2500x2048", help="rows x columns of the synthetic CRs")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (both contenders; on a GPU machine raise "
                        "--workers to the CPU cores and --batch to 8-32)")
    parser.add_argument("--json", type=Path, help="also write the numbers here (bench/plot.py reads them)")
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="cxrt-bench-") as tmp:
        root = Path(tmp)
        settings = InferenceSettings(preset=args.preset, batch_size=args.batch, device=args.device)
        settings = pin_untrained_weights(settings, root / "weights")
        lungs, disease = model_specs(settings)
        files = make_images(root / "in", args.images, rows, cols)
        net = CovidScoringNet(lungs, disease, disease.zone_threshold, args.device)
        pools = {
            "cxrtriage fp32": ScoringPool(settings, args.workers),
            "cxrtriage bf16": ScoringPool(settings.model_copy(update={"precision": "bf16"}), args.workers),
        }
        for pool in pools.values():
            pool.warm_up(files[0])
        run_reference(net, files[:1], root / "warm")
        contenders = {"covid_scoring": lambda out: run_reference(net, files, out)}
        contenders.update({name: (lambda out, p=pool: run_pool(p, files, out)) for name, pool in pools.items()})
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        busy: dict[str, list[float]] = {name: [] for name in contenders}
        zones: dict[str, list[list[int]]] = {}
        for round_ in range(args.rounds):
            for name, run in contenders.items():
                t0, (b0, a0) = time.perf_counter(), cpu_ticks()
                zones[name] = run(root / f"out-{round_}-{name.replace(' ', '-')}")
                seconds[name].append(time.perf_counter() - t0)
                b1, a1 = cpu_ticks()
                busy[name].append((b1 - b0) / max(a1 - a0, 1))
        for pool in pools.values():
            pool.close()

    rates = {name: args.images / statistics.median(s) for name, s in seconds.items()}
    base = rates["covid_scoring"]
    print(f"{args.images} CRs {rows}x{cols} on {args.device}, preset {args.preset} ({lungs.arch}/{lungs.encoder} @ {lungs.input_size}, "
          f"{disease.arch}/{disease.encoder} @ {disease.input_size}), {args.rounds} rounds (median), "
          f"{torch.get_num_threads()} cores, cxrtriage with {args.workers} worker processes, batch {args.batch}")
    report = {"preset": args.preset, "device": args.device, "images": args.images, "size": [rows, cols], "workers": args.workers,
              "batch": args.batch,
              "contenders": {}}
    for name, rate in rates.items():
        agree = agreement(zones["covid_scoring"], zones[name])
        cores_busy = statistics.median(busy[name])
        report["contenders"][name] = {"images_per_s": rate, "ratio": rate / base, "agreement": agree,
                                      "cores_busy": cores_busy}
        print(f"  {name:15s}: {rate:5.2f} images/s  ratio {rate / base:4.2f}  cores busy {100 * cores_busy:3.0f}%  "
              f"same 0-6 score as covid_scoring "
              f"{agree['same_total']}/{args.images} (MAE {agree['total_mae']:.2f}, zones {100 * agree['same_zone']:.0f}%)")
    fp32_bf16 = agreement(zones["cxrtriage fp32"], zones["cxrtriage bf16"])
    report["fp32_vs_bf16"] = fp32_bf16
    print(f"  cxrtriage fp32 vs bf16: same 0-6 score {fp32_bf16['same_total']}/{args.images}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
