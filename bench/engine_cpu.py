"""The scoring engine on the CPU against today's pool: images/s and CPU seconds per image, alternating.

    nice -n 10 python bench/engine_cpu.py [--images 24] [--rounds 3] [--processes 2] [--threads 0] [--ring-slots N]
                                          [--engine-threads 0] [--json bench/results/engine-cpu.json]

Both contenders score the same phantom CRs (2048 x 1664 by default) as the
node does (one blocking call per job from as many scoring threads as the node
gives that contender, no overlay): the :class:`~cxrtriage.inference.parallel.ScoringPool` with
``--processes`` workers each running the whole chain, and the
:class:`~cxrtriage.inference.engine_jobs.EnginePool` with ``--processes`` CPU
workers around one engine process (``device: cpu``). Each contender starts
and warms up once; rounds alternate between them. CPU seconds are the
process tree's (this process and its children), which survive a noisy
machine better than wall time. Scores are checked equal.
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

import psutil  # noqa: E402

from cxrtriage.config import InferenceSettings  # noqa: E402
from cxrtriage.inference.engine_jobs import EnginePool  # noqa: E402
from cxrtriage.inference.parallel import ScoringPool  # noqa: E402
from cxrtriage.inference.phantom import PhantomGenerator, write_cr  # noqa: E402


def tree_cpu() -> float:
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def run_round(score: Callable[[Path, str], Any], files: list[Path], threads: int) -> dict[str, Any]:
    c0, t0 = tree_cpu(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(lambda i: score(files[i], f"uid-{i}"), range(len(files))))
    wall, cpu = time.perf_counter() - t0, tree_cpu() - c0
    return {"wall_s": round(wall, 2), "images_per_s": round(len(files) / wall, 3),
            "cpu_s_per_image": round(cpu / len(files), 3), "totals": [o.total for o in outcomes]}


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
    parser.add_argument("--ring-slots", type=int, default=None,
                        help="a ring of this many shared-memory slots (default: the node's; none on a CPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    settings = InferenceSettings(device="cpu")
    with tempfile.TemporaryDirectory(prefix="cxrtriage-engine-bench-") as scratch:
        folder = Path(scratch)
        generate = PhantomGenerator(args.rows, args.cols)  # phantoms cost seconds each: four, repeated
        distinct = [write_cr(generate(7000 + i, affected_zones=((0, 3), (1, 4), (2,), ())[i]), folder / f"cr{i}.dcm")
                    for i in range(min(4, args.images))]
        files = [distinct[i % len(distinct)] for i in range(args.images)]
        pool = ScoringPool(settings, workers=args.processes)
        engine = EnginePool(settings, args.processes, engine_threads=args.engine_threads,
                            ring_slots=args.ring_slots)
        contenders: dict[str, Callable[[Path, str], Any]] = {
            "pool": lambda path, uid: pool.submit_instance(path, uid).result(),
            "engine": lambda path, uid: engine.score(path, uid),
        }
        threads = {"pool": args.threads or args.processes,
                   "engine": args.threads or 2 * args.processes + settings.max_batch}
        pool.warm_up(files[0])
        engine.warm_up(files[0])
        rounds: list[dict[str, Any]] = []
        try:
            for n in range(args.rounds):
                for name in (("pool", "engine") if n % 2 == 0 else ("engine", "pool")):
                    row = {"round": n, "contender": name, **run_round(contenders[name], files, threads[name])}
                    print(json.dumps(row), flush=True)
                    rounds.append(row)
            print("engine batch sizes (size: batches):", dict(sorted(engine.engine.batch_sizes.items())))
        finally:
            pool.close()
            engine.close()
    for name in ("pool", "engine"):
        rows = [r for r in rounds if r["contender"] == name]
        print(f"{name:7s} images/s {[r['images_per_s'] for r in rows]}  "
              f"CPU-s/image {[r['cpu_s_per_image'] for r in rows]}")
    assert len({tuple(r["totals"]) for r in rounds}) == 1, "the contenders' scores differ"
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds},
                                        indent=1))


if __name__ == "__main__":
    main()
