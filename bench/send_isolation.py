"""Sending: a healthy PACS's delivery time, alone and beside a destination that never answers.

    python bench/send_isolation.py [--objects 50] [--rounds 3] [--json out.json]

The node's send wiring (per-destination workers, circuit breakers, the
default 10 s / 30 s send timeouts) runs in this process against DCMTK
/usr/bin/storescp (healthy) and, in the "with hang" rounds, also a
pynetdicom SCP that accepts each association and never answers a C-STORE.
Each round is a fresh node (SQLite, its own archive) with ``--objects``
stored CRs queued to every destination; the time is from starting the send
workers to the last healthy job marked done. Rounds alternate alone / with
hang; every round is printed, then the medians. Issue #11 row 1: a hanging
destination used to take the healthy one from 2 s to 10 minutes for 12
objects.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from netutil import free_port, wait_port  # noqa: E402

from cxrtriage.config import Settings
from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.node import Node
from cxrtriage.storage.models import Instance, Job, JobKind, JobState


class Hanging:
    """Accepts every association and answers no C-STORE until released."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

        self.released = threading.Event()
        self.port = free_port()
        ae = AE(ae_title="HANG")
        ae.maximum_associations = 64
        ae.add_supported_context(ComputedRadiographyImageStorage)

        def hang(_: Any) -> int:
            self.released.wait(600)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, hang)])

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()


def one_round(work: Path, images: list[Path], with_hang: bool) -> tuple[float, float]:
    """Wall seconds until every object is stored at the healthy PACS (its jobs done), and the
    process CPU seconds meanwhile (the node's threads; storescp is a separate process in both modes)."""
    pacs_dir = work / "pacs"
    pacs_dir.mkdir(parents=True)
    port = free_port()
    pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(pacs_dir), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hang = Hanging() if with_hang else None
    node: Node | None = None
    try:
        wait_port(port)
        destinations = [{"ae_title": "PACS", "host": "127.0.0.1", "port": port}]
        if hang is not None:
            destinations.append({"ae_title": "HANG", "host": "127.0.0.1", "port": hang.port})
        node = Node(Settings.model_validate({
            "storage": {"database_url": f"sqlite:///{work / 'node.db'}", "archive_dir": str(work / "archive"),
                        "min_free_mb": 0},
            "workers": {"poll_seconds": 0.05},
            "destinations": destinations,
            "metrics": {"enabled": False}, "web": {"enabled": False},
        }))
        for path in images:
            assert node.ingest.store(path.read_bytes(), "1.2.840.10008.5.1.4.1.1.1", "BENCH", None) == 0
        with node.db.session() as session:
            for row in session.query(Instance).all():
                for d in node.destinations:
                    node.queue.enqueue(session, JobKind.SEND, row.id, d)
        t0, cpu0 = time.perf_counter(), time.process_time()
        node._start_sending()
        while True:
            with node.db.session() as session:
                left = session.query(Job).filter(Job.destination == "PACS", Job.state != JobState.DONE).count()
            if not left:
                return time.perf_counter() - t0, time.process_time() - cpu0
            if time.perf_counter() - t0 > 900:
                raise TimeoutError("the healthy PACS did not get everything in 15 minutes")
            time.sleep(0.02)
    finally:
        if hang is not None:
            hang.stop()
        if node is not None:
            node.stop()
        pacs.terminate()
        pacs.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="side of the square CRs sent")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the hang's timeouts are expected; the timings are the output
    base = Path(tempfile.mkdtemp(prefix="cxrtriage-bench-send-"))
    try:
        phantom = PhantomGenerator(args.size, args.size)(11)
        images = [write_cr(phantom, base / "images" / f"{i}.dcm") for i in range(args.objects)]
        times: dict[str, list[float]] = {"alone": [], "with hang": []}
        cpu: dict[str, list[float]] = {"alone": [], "with hang": []}
        for r in range(args.rounds):
            for mode in times:  # alternating, so drift in machine load hits both alike
                seconds, cpu_seconds = one_round(base / f"{mode.replace(' ', '-')}-{r}", images, mode == "with hang")
                times[mode].append(seconds)
                cpu[mode].append(cpu_seconds)
                print(f"round {r + 1} {mode:9s}: {args.objects} objects to the healthy PACS in {seconds:.2f} s "
                      f"(process CPU {cpu_seconds:.2f} s)", flush=True)
        medians = {mode: statistics.median(values) for mode, values in times.items()}
        for mode, value in medians.items():
            print(f"median {mode:9s}: {value:.2f} s  ({args.objects / value:.1f} objects/s)")
        print(f"with hang / alone: {medians['with hang'] / medians['alone']:.2f}")
        if args.json:
            args.json.write_text(json.dumps({"objects": args.objects, "size": args.size, "rounds": times,
                                             "cpu_seconds": cpu, "median_seconds": medians}, indent=2) + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
