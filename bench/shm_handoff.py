"""What handing an image to the scoring engine through shared memory costs: a new segment or a warm ring slot.

    python bench/shm_handoff.py [--rounds 5] [--repeats 10] [--json bench/results/shm-handoff.json]

For each image size (2048 x 1664 and 2500 x 2048) and each form of Stage II's image that a CPU worker hands
over (float32, or 16-bit stored values and a table), it times, in process CPU time per image:

* ``write``: the worker's copy of Stage I's input and that image into a new segment (:func:`~cxrtriage.
  inference.shm.write_block`, which the reader then unlinks) or into a ring slot mapped long ago
  (:func:`~cxrtriage.inference.shm.write_slot`);
* ``read``: the engine's side, in a second process: open the block and read every byte (a sum), then close.

Ways alternate in order from round to round; every round is kept. A new segment's pages are faulted in
by the writer and again by the reader; a ring's stay mapped in both.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrtriage.inference.shm import Block, create_ring, open_block, unlink, write_block, write_slot  # noqa: E402

SIZES = ((2048, 1664), (2500, 2048))
RING_SLOT_BYTES = 24 << 20  # as engine_jobs.RING_SLOT_BYTES


def arrays(shape: tuple[int, int], form: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    stage1 = rng.random((1, 256, 256), dtype=np.float32)
    if form == "float32":
        return {"stage1": stage1, "stage2": rng.random(shape, dtype=np.float32)}
    return {"stage1": stage1, "codes": rng.integers(0, 4096, shape, dtype=np.uint16),
            "table": rng.random(4096, dtype=np.float32)}


def cpu_ms(fn: Callable[[], Any], repeats: int) -> float:
    c0 = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - c0) * 1000 / repeats


def reader(requests: Any, replies: Any) -> None:
    """The engine's side: for each block sent, open it, read every array, close; reply with the CPU-ms."""
    while (block := requests.recv()) is not None:
        c0 = time.process_time()
        with open_block(block) as opened:
            for array in opened.values():
                float(array.sum(dtype=np.float64))
        replies.send((time.process_time() - c0) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    to_reader, requests = context.Pipe(duplex=False)
    replies, from_reader = context.Pipe(duplex=False)
    process = context.Process(target=reader, args=(to_reader, from_reader), daemon=True)
    process.start()
    ring, segment = create_ring(2, RING_SLOT_BYTES)
    rows: list[dict[str, Any]] = []
    try:
        ways = [(shape, form, way) for shape in SIZES for form in ("float32", "stored values")
                for way in ("new segment", "ring slot")]
        for n in range(args.rounds):
            for shape, form, way in (ways if n % 2 == 0 else ways[::-1]):
                data = arrays(shape, form)
                blocks: list[Block] = []

                def write(data: dict[str, np.ndarray] = data, way: str = way, blocks: list[Block] = blocks) -> None:
                    block = write_slot(ring, 0, data) if way == "ring slot" else write_block(data)
                    assert block is not None, "a slot too small for the image"
                    blocks.append(block)

                written = cpu_ms(write, args.repeats)
                read = []
                for block in blocks:
                    requests.send(block)
                    read.append(replies.recv())
                    if not block.in_ring:
                        unlink(block)
                rows.append({"round": n, "rows": shape[0], "cols": shape[1], "form": form, "way": way,
                             "write_cpu_ms": round(written, 2), "read_cpu_ms": round(statistics.median(read), 2)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        requests.send(None)
        process.join(10)
        segment.close()
        segment.unlink()
    print("\nmedian over rounds, CPU-ms per image (write in the worker / read in the engine):")
    for shape, form, way in ways:
        mine = [r for r in rows if (r["rows"], r["cols"], r["form"], r["way"]) == (*shape, form, way)]
        print(f"  {shape[0]}x{shape[1]} {form:14s} {way:12s} "
              f"{statistics.median(r['write_cpu_ms'] for r in mine):6.2f} / "
              f"{statistics.median(r['read_cpu_ms'] for r in mine):6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
