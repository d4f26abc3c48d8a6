"""A longer seeded fuzz of the receive path (tests/test_fuzz.py runs 60 cases).

    python bench/fuzz.py [--cases 2000] [--seed 1] [--database-url URL] [--json out.json]

Starts ``cxrtriage serve`` (scoring off) in a temporary folder, runs the
seeded cases of tests/fuzz.py with a good C-STORE every 10 cases, then checks
that every good image was stored, the node is still up, every fuzzed dataset
answered Success is held, and every archived file matches its SHA-256.
Prints the answers by kind and the wall time; any failure is printed with
its case number and mutation, so that it can become a case in
tests/bad_inputs.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrtriage.inference.phantom import PhantomGenerator, write_cr  # noqa: E402
from tests import fuzz  # noqa: E402
from tests.harness import NodeProcess  # noqa: E402
from tests.test_fuzz import check_nothing_lost  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        generator = PhantomGenerator(256, 224)
        good_cr = write_cr(generator(5_100_000), work / "seed.dcm")
        node = NodeProcess(work / "node", args.database_url or f"sqlite:///{work}/fuzz.db",
                           workers={"scoring_workers": 0},
                           dicom={"handshake_timeout": 2, "pdu_timeout": 2, "network_timeout": 5}).start()
        try:
            t0 = time.perf_counter()
            report = fuzz.run(node.port, good_cr,
                              lambda case: write_cr(generator(5_200_000 + case), work / f"good-{case}.dcm"),
                              seed=args.seed, count=args.cases, timeout=5.0)
            wall = time.perf_counter() - t0
            alive = node.process is not None and node.process.poll() is None
            failed_good = [o for o in report.good if o.answer != 0]
            lost = ""
            try:
                check_nothing_lost(node, report)
            except AssertionError as exc:
                lost = str(exc)
        finally:
            node.stop()
    result = {"cases": args.cases, "seed": args.seed, "wall_s": round(wall, 1), "node_alive": alive,
              "good_stores": len(report.good), "good_failed": [o.__dict__ for o in failed_good],
              "acknowledged_fuzzed": len(report.acknowledged()), "nothing_lost": not lost, "lost": lost,
              "answers": report.summary()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if alive and not failed_good and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
