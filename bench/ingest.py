"""Ingest: DCMTK storescp against the cxrtriage node, side by side in one run, at equal PDU sizes.

    python bench/ingest.py [--images 50] [--rounds 3] [--max-pdu 131072] [--node-max-pdu N]

50 synthetic 2500x2048 16-bit CRs are sent by DCMTK /usr/bin/storescu in one
association to (a) DCMTK storescp writing them to disk and (b) the node
(durable receive: fsync'd archive file, database row, scoring job enqueued;
scoring and sending switched off so that only ingest is measured). Both
receivers offer the same maximum PDU (``--max-pdu``, default 128 KiB, the largest
storescp accepts), so storescu sends PDUs of the same size to both; the node's own
default (1 MiB) can be measured with ``--node-max-pdu 1048576``, and the printout then
says that the PDU sizes differ. The two are measured alternately, ``--rounds`` times
each, every run kept; the medians and their ratio are printed. Issue #5 asks for
>= 0.8 of storescp. Scoring workers are off, so waking them on commit plays no part.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from netutil import free_port, wait_port
from pydicom.uid import generate_uid

from cxrtriage.inference.phantom import PhantomGenerator, write_cr

STORESCP_MAX_PDU = 131072  # DCMTK's ASC_MAXIMUMPDUSIZE: storescp accepts 4096..131072


def make_images(folder: Path, count: int) -> list[Path]:
    """One 2500x2048 phantom written ``count`` times with fresh UIDs (content does not matter here)."""
    import pydicom

    template = write_cr(PhantomGenerator(2500, 2048)(1), folder / "template.dcm")
    ds = pydicom.dcmread(template)
    files = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        path = folder / f"img{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    template.unlink()
    return files


def send(port: int, called: str, files: list[Path]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return elapsed


def timed_receiver(argv: list[str], port: int, called: str, files: list[Path]) -> float:
    """Start a receiver, time one storescu association into it, stop it."""
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send(port, called, files)
    finally:
        server.terminate()
        server.wait()


def run_storescp(work: Path, files: list[Path], max_pdu: int | None = None) -> float:
    out = work / f"storescp-{time.monotonic_ns()}"
    out.mkdir()
    port = free_port()
    pdu = ["--max-pdu", str(max_pdu)] if max_pdu else []
    return timed_receiver(["/usr/bin/storescp", "-aet", "STORESCP", *pdu, "-od", str(out), str(port)],
                          port, "STORESCP", files)


def node_command(folder: Path, port: int, **sections: dict) -> list[str]:
    """Write a node config (SQLite, no web page or metrics) into ``folder``; the command that serves it."""
    config = {
        "storage": {"database_url": f"sqlite:///{folder / 'db.sqlite'}", "archive_dir": str(folder / "archive")},
        "dicom": {"port": port},
        "web": {"enabled": False},
        "metrics": {"enabled": False},
        "logging": {"file": str(folder / "node.log")},
        **sections,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "cxrtriage", "serve", "-c", str(folder / "config.yaml")]


def run_node(work: Path, files: list[Path], max_pdu: int) -> float:
    folder = work / f"node-{time.monotonic_ns()}"
    folder.mkdir()
    port = free_port()
    argv = node_command(folder, port, workers={"scoring_workers": 0, "send_workers": 0},
                        dicom={"port": port, "maximum_pdu_size": max_pdu})
    return timed_receiver(argv, port, "CXRTRIAGE", files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-pdu", type=int, default=STORESCP_MAX_PDU,
                        help="maximum receive PDU of both receivers (storescp: 4096..131072)")
    parser.add_argument("--node-max-pdu", type=int, default=None,
                        help="the node's own, if it should differ (its default config: 1048576)")
    args = parser.parse_args()
    node_pdu = args.node_max_pdu or args.max_pdu
    with tempfile.TemporaryDirectory(prefix="cxrtriage-bench-") as tmp:
        work = Path(tmp)
        files = make_images(work / "images", args.images)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        dcmtk, node = [], []
        for _ in range(args.rounds):  # alternate, so drift in machine load hits both
            dcmtk.append(run_storescp(work, files, args.max_pdu))
            node.append(run_node(work, files, node_pdu))
        a, b = statistics.median(dcmtk), statistics.median(node)
        same = "equal" if node_pdu == args.max_pdu else "NOT equal: the ratio mixes PDU size with the receivers"
        print(f"{args.images} images, {megabytes:.0f} MB, one association, {args.rounds} rounds each (median); "
              f"max PDU storescp {args.max_pdu}, node {node_pdu} ({same})")
        for name, runs, median in (("DCMTK storescp", dcmtk, a), ("cxrtriage node", node, b)):
            print(f"  {name} : {args.images / median:6.1f} images/s  ({megabytes / median:6.0f} MB/s)  "
                  f"runs {np.round(runs, 2).tolist()} s")
        print(f"  ratio node / storescp: {a / b:.2f}  (goal >= 0.80)")


if __name__ == "__main__":
    main()
