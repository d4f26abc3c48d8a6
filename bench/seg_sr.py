"""CPU milliseconds per image to make the SEG + SR bytes: compiled templates vs highdicom, alternately.

    python bench/seg_sr.py [--images 3] [--rounds 5] [--phantoms DIR] [--json FILE]

The images are 2500 x 2048 phantom CRs scored by the bundled models (real,
non-empty masks; ``--phantoms`` reuses the files bench/cpu_steps.py keeps
there). Both contenders start from the same source dataset and result and
end with the file bytes the node stores: ``highdicom`` is the reference
builder plus pydicom's encoding, ``templates`` the node's path (the template
of the shape is compiled before timing, as a node compiles it once per
shape; that one-off cost is printed apart). Each round runs the two in turn,
alternating which goes first; the bytes of the two are checked to be equal
(same pinned time). Process CPU time (``time.process_time``) is reported
beside wall time; the table shows the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cxrtriage.config import InferenceSettings  # noqa: E402
from cxrtriage.inference.phantom import PhantomGenerator, write_cr  # noqa: E402
from cxrtriage.inference.pipeline import Pipeline  # noqa: E402
from cxrtriage.inference.radiograph import load_radiograph  # noqa: E402
from cxrtriage.inference.result_templates import clear_templates, encode_result_objects  # noqa: E402

ROWS, COLS = 2500, 2048
CONTENDERS = ("highdicom", "templates")


def timed(cases: list[tuple[Any, Any]], reference: bool, now: datetime) -> tuple[float, float, list[bytes]]:
    """(CPU ms, wall ms) per image, and the bytes made."""
    out: list[bytes] = []
    c0, w0 = time.process_time(), time.perf_counter()
    for source, result in cases:
        seg, sr = encode_result_objects(source, result, now=now, reference=reference)
        out += [seg.data, sr.data]
    n = len(cases)
    return (time.process_time() - c0) * 1000 / n, (time.perf_counter() - w0) * 1000 / n, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--phantoms", type=Path, default=None, help="keep and reuse the phantom CRs here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = Pipeline(InferenceSettings(device="cpu", threads=1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.phantoms or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        generator = PhantomGenerator(ROWS, COLS, p_normal=0.0)
        cases = []
        for i in range(args.images):
            path = folder / f"{ROWS}x{COLS}-{1_000 + i}.dcm"
            if not path.is_file():
                write_cr(generator(1_000 + i), path)
            r = load_radiograph(path)
            cases.append((r.dataset, pipeline(r)))
    now = datetime.now()
    clear_templates()
    c0 = time.process_time()
    encode_result_objects(*cases[0], now=now)  # compile the shape's template
    compile_ms = (time.process_time() - c0) * 1000
    rounds: list[dict[str, Any]] = []
    for k in range(args.rounds):
        order = CONTENDERS if k % 2 == 0 else CONTENDERS[::-1]
        row: dict[str, Any] = {"order": list(order)}
        made = {}
        for name in order:
            cpu, wall, made[name] = timed(cases, name == "highdicom", now)
            row[name] = {"cpu_ms": cpu, "wall_ms": wall}
        row["same_bytes"] = made["highdicom"] == made["templates"]
        rounds.append(row)
    median = {name: {m: statistics.median(r[name][m] for r in rounds) for m in ("cpu_ms", "wall_ms")}
              for name in CONTENDERS}
    masks = [(int(res.lungs.sum()), int(res.disease.sum())) for _, res in cases]
    print(f"{args.images} phantom CRs of {ROWS}x{COLS} (lung, opacity pixels: {masks}), {args.rounds} rounds, "
          "SEG + SR to bytes, per image (median)")
    for name in CONTENDERS:
        print(f"  {name:10s} CPU {median[name]['cpu_ms']:8.1f} ms   wall {median[name]['wall_ms']:8.1f} ms")
    print(f"  template compile, once per shape: CPU {compile_ms:.0f} ms")
    print(f"  same bytes in every round: {all(r['same_bytes'] for r in rounds)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join(sys.argv), "images": args.images, "rows": ROWS, "columns": COLS,
            "mask_pixels": masks, "compile_cpu_ms": compile_ms, "rounds": rounds, "median": median,
        }, indent=1))


if __name__ == "__main__":
    main()
