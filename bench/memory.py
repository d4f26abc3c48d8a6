"""Peak memory of one scoring process by backend and preset: what each pool worker needs.

    python bench/memory.py [--presets bundled paper] [--backends torch onnx] [--json bench/results/memory.json]

Each (preset, backend) runs in a fresh process, as a pool worker does: one
thread, the models loaded, two batches of two 2500 x 2048 phantom CRs scored
(both stages, full-resolution masks, zones). The process's peak resident set
(``ru_maxrss``) is the number to multiply by ``workers.scoring_processes``
when sizing a machine. ``paper`` is the danilov2022 architectures with the
phantom-trained weights of bench/paper_weights.py (trained on first use).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak(preset: str, backend: str) -> dict[str, Any]:
    """Score in this process and report its peak RSS (run by :func:`main` in a child of its own)."""
    import resource

    import torch
    from pipeline import bench_settings

    from cxrtriage.inference.phantom import PhantomGenerator
    from cxrtriage.inference.pipeline import Pipeline
    from cxrtriage.inference.radiograph import Radiograph

    torch.set_num_threads(1)
    settings = bench_settings(preset, "cpu", 2).model_copy(update={"backend": backend, "threads": 1})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    scorer = Pipeline(settings)
    radiograph = Radiograph(pixels=PhantomGenerator(2500, 2048)(7001).image, source="memory")
    for _ in range(2):
        scorer.run_batch([radiograph, radiograph])
    return {"preset": preset, "backend": backend, "predictor": type(scorer.lungs_model).__name__,
            "peak_rss_mb_before_models": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["bundled", "paper"], choices=["bundled", "paper"])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(peak(*args.child)))
        return
    rows = []
    for preset in args.presets:
        for backend in args.backends:
            done = subprocess.run([sys.executable, __file__, "--child", preset, backend], capture_output=True,
                                  text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
