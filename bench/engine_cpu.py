"""The scoring engine on the CPU against today's pool: images/s and CPU seconds per image, alternating.

    nice -n 10 python bench/engine_cpu.py [--images 24] [--rounds 3] [--processes 2] [--threads 0] [--ring-slots N[,M]]
                                          [--jobs-per-core N[,M]] [--engine-threads 0] [--json bench/results/engine-cpu.json]
                                          [--profile DIR]
    nice -n 10 python bench/engine_cpu.py --networks [--preset bundled|paper] [--rounds 3]

With ``--networks`` it times the networks alone instead, at one thread, per
image at batches of 1, 2, 4 and 8 (paper: 1 and 2), in three variants: torch
with BatchNorm folded into the convolutions (the node's default, ``bn_fold``),
torch without, and ONNX Runtime (process CPU time; sizes and variants in
alternating order each round): the measurements behind the CPU engine's batch
cap (``engine.CPU_MAX_BATCH``), the folding and the choice of backend.

Both contenders score the same phantom CRs (2048 x 1664 by default) as the
node does (one blocking call per job from as many scoring threads as the node
gives that contender, no overlay): the :class:`~cxrtriage.inference.parallel.ScoringPool` with
``--processes`` workers each running the whole chain, and the
:class:`~cxrtriage.inference.engine_jobs.EnginePool` around one engine process
(``device: cpu``) with ``--processes`` x ``--jobs-per-core`` CPU worker processes,
each scoring a whole job and sending its network calls to the engine. Each contender starts
and warms up once; rounds alternate between them. CPU seconds are the
process tree's (this process and its children), which survive a noisy
machine better than wall time, also split by process (the caller, the engine
process, the worker processes). Scores are checked equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import py_spy  # noqa: E402
from pipeline import tree_cpu  # noqa: E402

from cxrtriage.config import InferenceSettings  # noqa: E402
from cxrtriage.inference.engine_jobs import EnginePool  # noqa: E402
from cxrtriage.inference.parallel import ScoringPool  # noqa: E402
from cxrtriage.inference.phantom import PhantomGenerator, write_cr  # noqa: E402


def system_cpu() -> float:
    """Kernel CPU seconds so far of this process and every descendant (page faults, page zeroing, syscalls)."""
    import psutil

    total = psutil.Process().cpu_times().system
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.cpu_times().system
        except psutil.NoSuchProcess:
            pass
    return total


def run_round(score: Callable[[Path, str], Any], files: list[Path], threads: int,
              engine_pid: int | None = None) -> dict[str, Any]:
    c0, s0, t0 = tree_cpu(engine_pid), system_cpu(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(lambda i: score(files[i], f"uid-{i}"), range(len(files))))
    wall, c1, s1 = time.perf_counter() - t0, tree_cpu(engine_pid), system_cpu()
    ms = {role: round((c1[role] - c0[role]) * 1000 / len(files), 1) for role in c0}
    return {"wall_s": round(wall, 2), "images_per_s": round(len(files) / wall, 3),
            "cpu_s_per_image": round(sum(ms.values()) / 1000, 3), "cpu_ms_per_image_by_process": ms,
            "system_cpu_ms_per_image": round((s1 - s0) * 1000 / len(files), 1),
            "totals": [o.total for o in outcomes]}


#: The network variants ``--networks`` times: torch with each BatchNorm a pass of its own, torch with BatchNorm
#: folded into the convolutions (the node's default, ``bn_fold``), and ONNX Runtime's CPU provider
#: (``inference.backend: onnx``, which fuses the graph its own way).
VARIANTS = ("unfolded", "folded", "onnx")


def networks(rounds: int, preset: str, repeats: int = 4) -> dict[str, Any]:
    """CPU-ms per image of each network in each of :data:`VARIANTS` at each batch size, one thread; variants and
    sizes alternate in order from round to round."""
    import numpy as np
    import torch

    from cxrtriage.inference.predictors import OnnxPredictor, TorchPredictor
    from cxrtriage.inference.presets import bundled, danilov2022

    torch.set_num_threads(1)  # ONNX Runtime takes as many intra-op threads as torch has
    specs = bundled() if preset == "bundled" else danilov2022((False, False))  # paper: untrained; same cost
    sizes = (1, 2, 4, 8) if preset == "bundled" else (1, 2)
    models: dict[tuple[str, str], Any] = {}
    for name, spec in zip(("lungs", "disease"), specs):
        models[(name, "unfolded")] = TorchPredictor(spec, "cpu", fold_bn=False)
        models[(name, "folded")] = TorchPredictor(spec, "cpu", fold_bn=True)
        models[(name, "onnx")] = OnnxPredictor(spec, "cpu")
        print(f"{name} ({spec.arch}/{spec.encoder} @ {spec.input_size}): folded {models[(name, 'folded')].folded}")
    rows: list[dict[str, Any]] = []
    for n in range(rounds):
        order = [(size, variant) for size in sizes for variant in VARIANTS]
        for size, variant in (order if n % 2 == 0 else order[::-1]):
            for name in ("lungs", "disease"):
                model = models[(name, variant)]
                spec = model.spec
                x = np.random.default_rng(n).random((size, spec.in_channels, spec.input_size, spec.input_size),
                                                    dtype=np.float32)
                model(x)  # a first call per shape
                c0 = time.process_time()
                for _ in range(repeats):
                    model(x)
                ms = (time.process_time() - c0) * 1000 / (repeats * size)
                rows.append({"round": n, "network": name, "batch": size, "variant": variant,
                             "bn_folded": variant == "folded", "cpu_ms_per_image": round(ms, 1)})
                print(json.dumps(rows[-1]), flush=True)
    for name in ("lungs", "disease"):
        for variant in VARIANTS:
            print(f"{name:8s} {variant:8s} by batch size:",
                  {size: [r["cpu_ms_per_image"] for r in rows
                          if (r["network"], r["variant"], r["batch"]) == (name, variant, size)] for size in sizes})
    return {"rows": rows, "folded": {name: models[(name, "folded")].folded for name in ("lungs", "disease")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="scoring threads submitting jobs (0: as the node gives each contender: one per worker "
                             "process for the pool, 2 x workers + max_batch for the engine, stages/scorers.py)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=1664)
    parser.add_argument("--engine-threads", type=int, default=0,
                        help="the engine's torch threads (0: the node's choice)")
    parser.add_argument("--ring-slots", default=None,
                        help="a ring of this many shared-memory slots (default: the node's, 2 x (max_batch + "
                        "processes)); several, comma-separated, make one engine contender each (0: no ring, a new "
                        "segment per image and per output)")
    parser.add_argument("--jobs-per-core", default=None,
                        help="CPU worker processes per core of the engine, each scoring one whole job (default: "
                        "the node's, engine_jobs.JOBS_PER_CORE); several, comma-separated, make one contender each")
    parser.add_argument("--networks", action="store_true", help="time the networks alone by batch size")
    parser.add_argument("--preset", choices=("bundled", "paper"), default="bundled",
                        help="with --networks: the bundled networks, or the paper's (untrained: the same cost)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy over every process during each contender's last round, into "
                        "DIR/profile-<contender>.txt (summarise with bench/profile_summary.py); py-spy's own CPU "
                        "then counts with the workers, so CPU-ms are not comparable with a run without it")
    args = parser.parse_args()
    if args.networks:
        result = networks(args.rounds, args.preset)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result},
                                            indent=1))
        return

    settings = InferenceSettings(device="cpu")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cxrtriage-engine-bench-") as scratch:
        folder = Path(scratch)
        generate = PhantomGenerator(args.rows, args.cols)  # phantoms cost seconds each: four, repeated
        distinct = [write_cr(generate(7000 + i, affected_zones=((0, 3), (1, 4), (2,), ())[i]), folder / f"cr{i}.dcm")
                    for i in range(min(4, args.images))]
        files = [distinct[i % len(distinct)] for i in range(args.images)]
        pool = ScoringPool(settings, workers=args.processes)
        rings = [int(n) for n in args.ring_slots.split(",")] if args.ring_slots else [None]
        per_core = [int(n) for n in args.jobs_per_core.split(",")] if args.jobs_per_core else [0]
        variants = [(n, j) for n in rings for j in per_core]
        engines = {("engine" + (f", ring {n}" if len(rings) > 1 else "") + (f", {j} jobs/core" if len(per_core) > 1
                                                                            else "")):
                   EnginePool(settings, args.processes, engine_threads=args.engine_threads, ring_slots=n,
                              jobs_per_core=j)
                   for n, j in variants}
        contenders: dict[str, Callable[[Path, str], Any]] = {
            "pool": lambda path, uid: pool.submit_instance(path, uid).result(),
            **{name: (lambda path, uid, e=e: e.score(path, uid)) for name, e in engines.items()},
        }
        threads = {"pool": args.threads or args.processes,
                   **{name: args.threads or 2 * args.processes + settings.max_batch for name in engines}}
        pool.warm_up(files[0])
        for e in engines.values():
            e.warm_up(files[0])
        rounds: list[dict[str, Any]] = []
        order = list(contenders)
        try:
            for n in range(args.rounds):
                for name in (order if n % 2 == 0 else order[::-1]):
                    engine_pid = engines[name].engine.pid if name in engines else None  # alive: pids stay
                    spy = (args.profile / f"profile-{name.replace(', ', '-').replace(' ', '')}.txt"
                           if args.profile and n == args.rounds - 1 else None)
                    with py_spy(spy):  # nothing without --profile
                        row = {"round": n, "contender": name,
                               **run_round(contenders[name], files, threads[name], engine_pid)}
                    print(json.dumps(row), flush=True)
                    rounds.append(row)
            for name, e in engines.items():
                print(f"{name} batch sizes (size: batches):", dict(sorted(e.engine.batch_sizes.items())))
        finally:
            pool.close()
            for e in engines.values():
                e.close()
    for name in order:
        rows = [r for r in rounds if r["contender"] == name]
        print(f"{name:7s} images/s {[r['images_per_s'] for r in rows]}  "
              f"CPU-s/image {[r['cpu_s_per_image'] for r in rows]}  "
              f"of it in the kernel, ms {[r['system_cpu_ms_per_image'] for r in rows]}  "
              f"CPU-ms/image by process {[r['cpu_ms_per_image_by_process'] for r in rows]}")
    assert len({tuple(r["totals"]) for r in rounds}) == 1, "the contenders' scores differ"
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds},
                                        indent=1))


if __name__ == "__main__":
    main()
