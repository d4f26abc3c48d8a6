"""End-to-end latency under steady load: C-STORE success to SR accepted by the PACS.

    python bench/latency.py [--rates 1 5] [--images 30] [--json out.json]

A node (bundled models, SQLite) is started with one destination: a pynetdicom storage SCP
in this process, standing in for PACS; twice, one after the other: with the default
settings (one scoring thread, fp32) and with ``workers.scoring_processes: 2`` and
``inference.precision: bf16``. For each rate, ``--images``
distinct synthetic 2500x2048 CRs are sent at that steady rate, one association per image as
a modality would. For each image the clock runs from the moment the node answers C-STORE
success to the moment the destination has received the image's SR (the node sends the SEG
and the SR; the SR is written after the SEG). p50 / p95 / max are printed, with the node's
throughput over the run; when images arrive faster than the node scores them, the queue
grows and so does the latency (nothing is dropped).
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
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComputedRadiographyImageStorage, SegmentationStorage

from ingest import free_port, node_command, wait_port
from pipeline import make_images


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 5.0], help="images per second")
    parser.add_argument("--images", type=int, default=30, help="images per rate")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict[str, object] = {"images": args.images, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cxrtriage-latency-") as tmp:
        root = Path(tmp)
        files = make_images(root / "images", args.images * len(args.rates) * len(VARIANTS) + 1, 2500, 2048)
        destination = Destination()
        print(f"{args.images} CRs 2500x2048 per rate; bundled models, SQLite; one association per image; "
              "latency = C-STORE success -> SR received by the destination")
        for v, (variant, overrides) in enumerate(VARIANTS.items()):
            node, port = start_node(root / f"node{v}", destination.port, overrides)
            try:
                warm = files[-1:]
                destination.arrived.clear()
                send_steadily(port, warm, 1.0)  # warm-up: models and highdicom's first call
                destination.wait_for([str(pydicom.dcmread(warm[0]).SOPInstanceUID)], 300)
                destination.arrived.clear()
                print(f"  {variant}")
                for n, rate in enumerate(args.rates):
                    first = (v * len(args.rates) + n) * args.images
                    batch = files[first : first + args.images]
                    t0 = time.monotonic()
                    acknowledged = send_steadily(port, batch, rate)
                    destination.wait_for(list(acknowledged), 600)
                    elapsed = max(destination.arrived[u] for u in acknowledged) - t0
                    latency = [destination.arrived[u] - t for u, t in acknowledged.items()]
                    run = {"variant": variant, "rate": rate, "p50": percentile(latency, 50),
                           "p95": percentile(latency, 95), "max": max(latency), "mean": statistics.fmean(latency),
                           "throughput": len(batch) / elapsed, "latencies": latency}
                    report["runs"].append(run)  # type: ignore[union-attr]
                    print(f"    {rate:4.1f} images/s offered: p50 {run['p50']:6.2f} s  p95 {run['p95']:6.2f} s  "
                          f"max {run['max']:6.2f} s   (node finished {run['throughput']:.2f} images/s)")
            finally:
                node.terminate()
                node.wait(timeout=60)
        destination.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
