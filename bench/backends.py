"""Pipeline throughput: eager torch (fp32, bf16) against ONNX Runtime, same models, side by side.

    python bench/backends.py [--images 40] [--rounds 3] [--config config.yaml]

Both pipelines score the same synthetic 2048x1800 radiographs (decode excluded,
everything else included: both stages, full-resolution masks, scoring),
alternating in rounds; medians and the ratio are printed, and the scores are
checked to agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

from cxrtriage.config import load_settings
from cxrtriage.inference.phantom import PhantomGenerator
from cxrtriage.inference.pipeline import Pipeline
from cxrtriage.inference.radiograph import Radiograph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    settings = load_settings(args.config).inference
    pipelines = {
        "torch": Pipeline(settings.model_copy(update={"backend": "torch"})),
        "onnx": Pipeline(settings.model_copy(update={"backend": "onnx"})),
        "bf16": Pipeline(settings.model_copy(update={"backend": "torch", "precision": "bf16"})),
    }
    generator = PhantomGenerator(2048, 1800)
    images = [Radiograph(pixels=generator(8_000_000 + i).image, source=str(i)) for i in range(args.images)]
    for pipeline in pipelines.values():  # warm-up
        pipeline(images[0])
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    totals: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, pipeline in pipelines.items():
            t0 = time.perf_counter()
            totals[name] = [pipeline(image).scores.total for image in images]
            times[name].append(time.perf_counter() - t0)
    torch_s = statistics.median(times["torch"])
    print(f"{args.images} images 2048x1800, {args.rounds} rounds each (median), models {pipelines['torch'].model_versions}")
    for name, label in (("torch", "torch fp32 (eager, channels_last)"), ("onnx", "ONNX Runtime (CPU)"),
                        ("bf16", "torch bf16 (eager, channels_last)")):
        seconds = statistics.median(times[name])
        same = sum(a == b for a, b in zip(totals["torch"], totals[name]))
        print(f"  {label:34s}: {args.images / seconds:5.2f} images/s  ratio to torch fp32 {torch_s / seconds:.2f}  "
              f"same 0-6 scores {same}/{args.images}")


if __name__ == "__main__":
    main()
