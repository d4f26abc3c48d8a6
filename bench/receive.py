"""CPU milliseconds per image of the node's C-STORE receive, alone, at the PDU sizes a modality sends.

    python bench/receive.py [--images 20] [--rounds 3] [--max-pdu 1048576 131072] [--json FILE]

DCMTK's ``storescu`` (another process) sends ``--images`` distinct 2500 x 2048 16-bit CRs (10 MB each)
in one association to the node's storage SCP, running in this process behind its guard, as
``bench/cpu_steps.py`` measures its ``receive`` step: this process's CPU time (all threads: the
guard's reads, pynetdicom's DUL and DIMSE decoding, parsing, SHA-256, the fsync'd archive write and
the database row) divided by the images; and apart from it the C-STORE handler's own thread CPU
(``Ingest.handle``: parse, checks, SHA-256, archive write, catalogue), which leaves out the transport's
threads and so varies less from run to run. The node offers each ``--max-pdu`` in turn (storescu then
sends P-DATA-TF PDUs of that size: 1 MiB is the node's default, 128 KiB what storescp accepts), the sizes
alternating, ``--rounds`` times, every run kept in the JSON. Issue #15's goal for this step: at or below
55 ms per 10 MB image. Before the rounds it prints what writing 10 MB into a new file costs this
machine's kernel (thread CPU, without and with fsync): the floor under the archive write.

To compare two trees, copy this script into the other tree's bench/ and alternate the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import make_images  # noqa: E402
from netutil import free_port  # noqa: E402

from cxrtriage.config import DicomSettings  # noqa: E402
from cxrtriage.observability import Metrics  # noqa: E402
from cxrtriage.scp.ingest import Ingest  # noqa: E402
from cxrtriage.scp.server import start_server  # noqa: E402
from cxrtriage.storage.archive import Archive  # noqa: E402
from cxrtriage.storage.db import Database  # noqa: E402
from cxrtriage.storage.queue import JobQueue  # noqa: E402


def receive(files: list[Path], scratch: Path, max_pdu: int) -> dict[str, float]:
    """CPU and wall ms per image while the node's SCP, offering ``max_pdu``, receives ``files``."""
    db = Database(f"sqlite:///{scratch / 'receive.db'}")
    db.migrate()
    ingest = Ingest(db, Archive(scratch / "archive"), JobQueue(db), Metrics(), 0, 3)
    settings = DicomSettings(port=free_port(), maximum_pdu_size=max_pdu)
    handler_cpu = [0.0]

    def handle(evt: Any) -> int:  # the C-STORE handler's own thread CPU, apart from the transport's threads
        t0 = time.thread_time()
        try:
            return ingest.handle(evt)
        finally:
            handler_cpu[0] += time.thread_time() - t0

    unused = {name: (lambda e: iter(())) for name in ("find", "move", "get")}  # only C-STORE is measured
    server = start_server(settings, {"store": handle, **unused})
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        subprocess.run(["/usr/bin/storescu", "-aec", settings.ae_title, "127.0.0.1", str(settings.port),
                        *map(str, files)], check=True, capture_output=True)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        server.shutdown()
        db.dispose()
    return {"cpu_ms_per_image": round(cpu * 1000 / len(files), 2),
            "handler_cpu_ms_per_image": round(handler_cpu[0] * 1000 / len(files), 2),
            "wall_ms_per_image": round(wall * 1000 / len(files), 2)}


def page_cache_write_ms(folder: Path, files: int = 5) -> dict[str, float]:
    """Thread CPU-ms of writing 10 MB into a new file (page cache only, then with fsync): the floor under the
    archive write on this machine's disk, whatever the node's code does."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(10 * 1024 * 1024)
    out: dict[str, float] = {}
    for fsync in (False, True):
        t0 = time.thread_time()
        for i in range(files):
            with open(folder / f"probe-{fsync}-{i}", "wb") as handle:
                handle.write(data)
                if fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
        out["write_fsync" if fsync else "write"] = round((time.thread_time() - t0) * 1000 / files, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-pdu", type=int, nargs="+", default=[1 << 20, 131072])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxrt-receive-") as tmp:
        root = Path(tmp)
        files = make_images(root / "in", args.images)
        probe = page_cache_write_ms(root / "probe")
        print(f"  writing 10 MB into a new file here costs {probe['write']:.1f} thread CPU-ms "
              f"({probe['write_fsync']:.1f} with fsync)", flush=True)
        runs: dict[int, list[dict[str, float]]] = {pdu: [] for pdu in args.max_pdu}
        for r in range(args.rounds):
            for pdu in args.max_pdu:
                run = receive(files, root / f"r{r}-{pdu}", pdu)
                runs[pdu].append(run)
                print(f"  round {r + 1} max PDU {pdu:8d}: {run['cpu_ms_per_image']:6.1f} CPU-ms/image, of which the "
                      f"handler {run['handler_cpu_ms_per_image']:.1f} ({run['wall_ms_per_image']:.1f} ms wall)", flush=True)
    summary = {pdu: statistics.median(run["cpu_ms_per_image"] for run in rs) for pdu, rs in runs.items()}
    for pdu, ms in summary.items():
        print(f"max PDU {pdu}: median {ms:.1f} CPU-ms per 10 MB image (goal <= 55), rounds "
              + ", ".join(f"{run['cpu_ms_per_image']:.1f}" for run in runs[pdu]) + "; the handler's "
              + ", ".join(f"{run['handler_cpu_ms_per_image']:.1f}" for run in runs[pdu]))
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "images": args.images, "rounds": args.rounds,
                                         "page_cache_write_cpu_ms_per_10mb": probe,
                                         "runs": {str(p): rs for p, rs in runs.items()},
                                         "median_cpu_ms_per_image": {str(p): v for p, v in summary.items()}},
                                        indent=1))


if __name__ == "__main__":
    main()
