"""CPU-ms per image of the scoring engine's two CPU worker steps, ``engine_jobs.prepare`` and ``finish``, 2500 x 2048.

    nice -n 10 python bench/prepare.py [--images 10] [--rounds 3] [--preset bundled|paper]
                                       [--stage1 host device] [--json F]

``prepare`` is what each CPU worker of a GPU box does before the engine:
read the file, decode, the stored-value table, Stage I's input, and the copy
into a ring slot (``stored_values``: Stage II's image as its stored values and
table, as for a device engine). On the H200 (docs/benchmarks.md, GPU run 4)
it took 46.7 ms an image, the larger part of the workers' CPU. This script
runs it in this process at one thread (as a worker runs it), on phantom CRs
written once (12-bit stored values in 16-bit words, as most CRs), warm: each
round scores every image once untimed, then ``--images`` timed; the process
CPU time per image of every round is printed and kept. ``--stage1`` names
where Stage I's input is made: ``host`` (here, as by default) or ``device``
(``inference.stage1_on_device``: left to the engine); with both, every round
runs each in turn, the order alternating. Compare trees by running each
tree's copy of this script alternately.

``finish`` is each worker's second step (the full-resolution masks from the
engine's outputs, zones and scores, SEG + SR encoded, no overlay): timed
the same way, after ``prepare``, on outputs the engine's own CPU stages
made for these images once (untimed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import bench_settings  # noqa: E402

from cxrtriage.inference import engine_jobs  # noqa: E402
from cxrtriage.inference.engine import HostStages, _run_batch  # noqa: E402
from cxrtriage.inference.phantom import PhantomGenerator, write_cr  # noqa: E402
from cxrtriage.inference.shm import create_ring, unlink  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", choices=("bundled", "paper"), default="bundled")
    parser.add_argument("--stage1", nargs="+", choices=("host", "device"), default=["host", "device"],
                        help="where Stage I's input is made (device: inference.stage1_on_device)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = bench_settings(args.preset, "cpu", 2)  # paper: phantom-trained weights (bench/paper_weights.py)
    engine_jobs._start_worker(settings.model_dump_json(), 1)  # as a worker process starts: one thread
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxrtriage-prepare-") as scratch:
        generate = PhantomGenerator(2500, 2048)
        files = [write_cr(generate(7000 + i, affected_zones=((0, 3), (1, 4))[i]), Path(scratch) / f"cr{i}.dcm")
                 for i in range(2)]
        ring, segment = create_ring(4, engine_jobs.RING_SLOT_BYTES)
        held: list[Any] = []
        engine_out: list[Any] = []
        try:
            def run(n: int, stage1: str) -> None:
                for i in range(n):
                    prepared = engine_jobs.prepare(files[i % 2], f"uid-{i}", False, True, (ring, i % 4),
                                                   stage1_on_device=stage1 == "device")
                    assert isinstance(prepared, engine_jobs.Prepared)
                    unlink(prepared.block)

            # the engine's outputs for each file, once: what finish starts from
            held += [engine_jobs.prepare(path, f"uid-{i}", False, True) for i, path in enumerate(files)]
            assert all(isinstance(p, engine_jobs.Prepared) for p in held)
            replies = _run_batch(HostStages(settings), [(i, p.block) for i, p in enumerate(held)], 1)
            engine_out += [r.output for r in replies]
            assert all(o is not None for o in engine_out), [r.error for r in replies]

            def finish(n: int) -> None:
                for i in range(n):
                    outcome = engine_jobs.finish(held[i % 2], engine_out[i % 2], None, False, False)
                    assert outcome.seg is not None and outcome.sr is not None

            for n in range(args.rounds):
                for stage1 in (args.stage1 if n % 2 == 0 else args.stage1[::-1]):
                    run(len(files), stage1)  # warm: the slots' pages and the first call
                    c0 = time.process_time()
                    run(args.images, stage1)
                    rounds.append({"round": n, "step": "prepare", "stage1": stage1,
                                   "cpu_ms_per_image": round((time.process_time() - c0) * 1000 / args.images, 2)})
                    print(json.dumps(rounds[-1]), flush=True)
                finish(len(files))
                c0 = time.process_time()
                finish(args.images)
                rounds.append({"round": n, "step": "finish",
                               "cpu_ms_per_image": round((time.process_time() - c0) * 1000 / args.images, 2)})
                print(json.dumps(rounds[-1]), flush=True)
        finally:
            for p in held:
                unlink(p.block)
            for o in engine_out:
                unlink(o.block if o is not None else None)
            segment.close()
            segment.unlink()
    for stage1 in args.stage1:
        print(f"prepare, {args.preset}, 2500x2048, Stage I's input made on the {stage1}: CPU-ms per image by round "
              f"{[r['cpu_ms_per_image'] for r in rounds if r.get('stage1') == stage1]}")
    print(f"finish, {args.preset}, 2500x2048: CPU-ms per image by round "
          f"{[r['cpu_ms_per_image'] for r in rounds if r['step'] == 'finish']}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds},
                                        indent=1))


if __name__ == "__main__":
    main()
