"""The two networks alone, per image, on this machine: fp32 eager, bf16 weights, ONNX Runtime.

    python bench/models.py [--preset danilov2022] [--threads 1 2] [--repeat 5] [--json bench/results/models.json]

Each stage's model (DeepLabV3+/efficientnet-b1 @ 512 and MA-Net/regnetx_064 @ 544 for the
paper's pair; the bundled pair with ``--preset bundled``) is called on one ready input
through cxrtriage's own predictors (``cxrtriage.inference.predictors``: channels_last,
inference mode; bf16 converts weights and inputs), after two warm-up calls. The median of
``--repeat`` calls is printed, with the process CPU time per call beside it. Weights are
untrained (the speed does not depend on them). This is the script behind the "Models on
this CPU" table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxrtriage.inference.models import ModelSpec  # noqa: E402
from cxrtriage.inference.predictors import make_predictor  # noqa: E402
from cxrtriage.inference.presets import bundled, danilov2022  # noqa: E402

VARIANTS = (("fp32 eager", "torch", "fp32"), ("bf16 weights", "torch", "bf16"), ("ONNX Runtime", "onnx", "fp32"))


def time_model(spec: ModelSpec, backend: str, precision: str, repeat: int) -> dict[str, Any]:
    predictor = make_predictor(spec, backend, "cpu", precision)
    x = np.random.default_rng(0).standard_normal((1, spec.in_channels, spec.input_size, spec.input_size),
                                                 dtype=np.float32)
    for _ in range(2):
        predictor(x)
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        predictor(x)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return {"ms": statistics.median(wall), "cpu_ms": statistics.median(cpu), "runs_ms": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="danilov2022", choices=["danilov2022", "bundled"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    specs = danilov2022((False, False)) if args.preset == "danilov2022" else bundled()
    report: dict[str, Any] = {"preset": args.preset, "repeat": args.repeat, "results": []}
    print(f"ms per image (batch 1), median of {args.repeat}; CPU ms of this process beside it")
    for spec in specs:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for label, backend, precision in VARIANTS:
                numbers = time_model(spec, backend, precision, args.repeat)
                model = f"{spec.arch}/{spec.encoder} @ {spec.input_size}"
                report["results"].append({"model": model, "threads": threads, "variant": label, **numbers})
                print(f"  {model:36s} {threads} thread(s)  {label:13s} {numbers['ms']:8.1f} ms  "
                      f"({numbers['cpu_ms']:.0f} CPU ms)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
