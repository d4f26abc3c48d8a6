"""End-to-end latency at a steady rate below capacity: C-STORE success to SR accepted by the PACS.

    python bench/latency.py [--load 0.5 0.8] [--duration 60] [--json bench/results/latency.json]
    python bench/latency.py --rates 2 --duration 30 --variant gpu='{"inference": {"device": "cuda"}}'

A node (bundled models, SQLite) is started with one destination: a pynetdicom storage SCP
in this process, standing in for PACS; once per variant, one after the other (default: the
default settings, and ``workers.scoring_processes: 2`` with ``inference.precision: bf16``).

1. **Capacity**: ``--burst`` images sent back to back (one association each); capacity is
   burst / (first C-STORE to last SR at the destination). Reported on its own line: it is
   what the node finishes when saturated, not a latency.
2. **Steady state**: for each offered rate (``--load`` fractions of the measured capacity,
   or fixed ``--rates`` in images/s), distinct CRs are sent at that rate for ``--duration``
   seconds, one association per image as a modality would. The first ``--settle`` seconds
   are not counted; p50 / p95 / max come from the rest. The run is marked *not steady* when
   the second half's median latency exceeds the first half's by more than half (a queue
   that keeps growing: the rate is above capacity).

For each image the clock runs from the moment the node answers C-STORE success to the
moment the destination has received the image's SR (the node sends the SEG, then the SR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from ingest import free_port, node_command, wait_port
from pipeline import make_images, replicate
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComputedRadiographyImageStorage, SegmentationStorage


class Destination:
    """A storage SCP noting when each source image's SR arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.lock = threading.Lock()
        self.ae = AE(ae_title="FAKEPACS")
        self.ae.add_supported_context(SegmentationStorage)
        self.ae.add_supported_context(Comprehensive3DSRStorage)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        if ds.SOPClassUID == Comprehensive3DSRStorage:
            now = time.monotonic()
            with self.lock:
                for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
                    for series in study.ReferencedSeriesSequence:
                        for item in series.ReferencedSOPSequence:
                            self.arrived.setdefault(str(item.ReferencedSOPInstanceUID), now)
        return 0x0000

    def wait_for(self, uids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(uid in self.arrived for uid in uids):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{sum(u not in self.arrived for u in uids)} SRs did not arrive in {timeout:.0f} s")

    def close(self) -> None:
        self.server.shutdown()


VARIANTS: dict[str, dict] = {
    "defaults (1 scoring thread, fp32)": {},
    "2 scoring processes, bf16": {"workers": {"scoring_processes": 2}, "inference": {"precision": "bf16"}},
}


def start_node(folder: Path, destination_port: int, overrides: dict) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True)
    port = free_port()
    destinations = [{"ae_title": "FAKEPACS", "host": "127.0.0.1", "port": destination_port}]
    argv = node_command(folder, port, destinations=destinations, **overrides)
    node = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return node, port


def send_steadily(port: int, files: list[Path], rate: float) -> dict[str, float]:
    """Send one file per association every 1/rate s; return the C-STORE success time of each."""
    sender = AE(ae_title="MODALITY")
    sender.add_requested_context(ComputedRadiographyImageStorage)
    datasets = [pydicom.dcmread(f) for f in files]
    acknowledged: dict[str, float] = {}
    start = time.monotonic()
    for i, ds in enumerate(datasets):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        assoc = sender.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
        if not assoc.is_established:
            raise RuntimeError("the node refused the association")
        status = assoc.send_c_store(ds)
        acknowledged[str(ds.SOPInstanceUID)] = time.monotonic()
        assoc.release()
        if status.Status != 0x0000:
            raise RuntimeError(f"C-STORE status 0x{status.Status:04X}")
    return acknowledged


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class Images:
    """Distinct phantoms, then copies with fresh UIDs: every image sent is a new instance to the node."""

    def __init__(self, folder: Path, distinct: int) -> None:
        self.folder = folder
        self.distinct = make_images(folder, distinct, 2500, 2048)
        self.used = 0

    def take(self, count: int) -> list[Path]:
        files = replicate(self.distinct, count, self.folder / f"batch{self.used}", fresh=True)
        self.used += count
        return files


def capacity(port: int, destination: Destination, files: list[Path]) -> float:
    """Images/s the node finishes when images arrive back to back."""
    destination.arrived.clear()
    t0 = time.monotonic()
    acknowledged = send_steadily(port, files, 1000.0)
    destination.wait_for(list(acknowledged), 900)
    return len(files) / (max(destination.arrived[u] for u in acknowledged) - t0)


def steady(port: int, destination: Destination, files: list[Path], rate: float, settle: float) -> dict[str, object]:
    destination.arrived.clear()
    t0 = time.monotonic()
    acknowledged = send_steadily(port, files, rate)
    destination.wait_for(list(acknowledged), 900)
    elapsed = max(destination.arrived[u] for u in acknowledged) - t0
    counted = [(t, destination.arrived[u] - t) for u, t in acknowledged.items() if t - t0 >= settle]
    latency = [lat for _, lat in counted]
    half = len(latency) // 2
    first, second = statistics.median(latency[:half] or latency), statistics.median(latency[half:])
    return {"rate": rate, "images": len(files), "counted": len(latency), "settle_s": settle,
            "p50": percentile(latency, 50), "p95": percentile(latency, 95), "max": max(latency),
            "mean": statistics.fmean(latency), "first_half_p50": first, "second_half_p50": second,
            "steady": second <= 1.5 * first + 0.05, "throughput": len(files) / elapsed, "latencies": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=float, nargs="+", default=[0.5, 0.8],
                        help="offered rates as fractions of the measured capacity")
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="fixed offered rates (images/s) instead")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sending per rate")
    parser.add_argument("--settle", type=float, default=None, help="seconds not counted (default: a quarter)")
    parser.add_argument("--burst", type=int, default=12, help="images of the capacity measurement")
    parser.add_argument("--distinct", type=int, default=12, help="distinct phantoms drawn (the rest are copies)")
    parser.add_argument("--variant", action="append", default=None, metavar="NAME=JSON",
                        help="node config overrides to measure instead of the two default variants")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = VARIANTS
    if args.variant:
        variants = {name: json.loads(text) for name, text in (v.split("=", 1) for v in args.variant)}
    settle = args.settle if args.settle is not None else args.duration / 4
    report: dict[str, object] = {"duration_s": args.duration, "settle_s": settle, "capacity": {}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cxrtriage-latency-") as tmp:
        root = Path(tmp)
        images = Images(root / "images", args.distinct)
        destination = Destination()
        print(f"CRs 2500x2048, {args.duration:.0f} s per rate ({settle:.0f} s not counted); one association per "
              "image; latency = C-STORE success -> SR received by the destination")
        for v, (variant, overrides) in enumerate(variants.items()):
            node, port = start_node(root / f"node{v}", destination.port, overrides)
            try:
                warm = images.take(1)
                destination.arrived.clear()
                send_steadily(port, warm, 1.0)  # warm-up: models and highdicom's first call
                destination.wait_for([str(pydicom.dcmread(warm[0]).SOPInstanceUID)], 300)
                cap = capacity(port, destination, images.take(args.burst))
                report["capacity"][variant] = cap  # type: ignore[index]
                print(f"  {variant}: capacity {cap:.2f} images/s ({args.burst} images back to back)")
                rates = args.rates or [round(f * cap, 2) for f in args.load]
                for rate in rates:
                    count = max(4, round(rate * args.duration))
                    run = {"variant": variant, "capacity": cap,
                           **steady(port, destination, images.take(count), rate, settle)}
                    report["runs"].append(run)  # type: ignore[attr-defined]
                    flag = "" if run["steady"] else "  NOT STEADY (the queue kept growing)"
                    print(f"    {rate:5.2f} images/s offered ({rate / cap:.0%} of capacity): p50 {run['p50']:6.2f} s  "
                          f"p95 {run['p95']:6.2f} s  max {run['max']:6.2f} s  over {run['counted']} images  "
                          f"(node finished {run['throughput']:.2f} images/s){flag}")
            finally:
                node.terminate()
                node.wait(timeout=60)
        destination.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
