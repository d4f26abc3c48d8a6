"""Receive path under hostile peers: C-STORE time with and without a flood, and memory under oversize datasets.

    python bench/hostile_peers.py [--rounds 5] [--hostile 32] [--oversize-mb 64] [--streams 16]

1. A good C-STORE (pynetdicom SCU, one 1024x880 16-bit CR, fresh UIDs) is
   timed with no other peer and with ``--hostile`` sockets of EACH kind
   open at once: random bytes, an HTTP request, an A-ASSOCIATE-RQ declaring
   0xFFFFFFF0 bytes, idle TCP, an A-ASSOCIATE-RQ dripped a byte at a time, a
   P-DATA-TF declaring 0xFFFFFFF0 bytes after a valid association. Rounds
   alternate (none, flood, none, ...); every round is printed, then the medians.
2. ``--streams`` C-STOREs of an ``--oversize-mb`` dataset arrive at once at a
   node with ``max_dataset_mb`` 8 (the guard drops fragments past the cap and
   answers 0xA700) and at one whose cap is above the dataset size (the whole
   dataset is buffered, as pynetdicom alone does). The node's peak RSS
   (VmHWM) is printed for both.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ for the bomb builder

import pydicom
import yaml
from netutil import free_port  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from cxrtriage.inference.phantom import PhantomGenerator, write_cr

VERIFICATION = "1.2.840.10008.1.1"


def start_node(folder: Path, **dicom: object) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "node_name": "bench",
        "storage": {"database_url": f"sqlite:///{folder / 'node.db'}", "archive_dir": str(folder / "archive"),
                    "min_free_mb": 1},
        "dicom": {"port": port, "ae_title": "CXRTRIAGE", **dicom},
        "metrics": {"port": 0}, "web": {"port": 0},
        "workers": {"scoring_workers": 0},
        "logging": {"file": str(folder / "node.log")},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    out = open(folder / "stdout.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cxrtriage", "serve", "-c", str(folder / "config.yaml")],
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the node did not listen")


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- hostile peers ---------------------------------------------------------

def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq() -> bytes:
    context = bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION.encode()) + _item(0x40, b"1.2.840.10008.1.2")
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999")
    body = (struct.pack(">HH", 1, 0) + b"CXRTRIAGE".ljust(16) + b"HOSTILE".ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, context) + _item(0x50, user))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


def _send(payload: bytes) -> Callable[[int], socket.socket]:
    def open_(port: int) -> socket.socket:
        sock = _connect(port)
        if payload:
            sock.sendall(payload)
        return sock
    return open_


def _huge_pdata(port: int) -> socket.socket:
    sock = _connect(port)
    sock.sendall(associate_rq())
    header = sock.recv(6)
    if header[:1] == b"\x02":
        sock.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + bytes(64))
    return sock


KINDS: dict[str, Callable[[int], socket.socket]] = {
    "random bytes": lambda port: _send(os.urandom(512))(port),
    "HTTP request": _send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "A-ASSOCIATE-RQ 0xFFFFFFF0": _send(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\x00\x01\x00\x00"),
    "idle TCP": _send(b""),
    "slow drip A-ASSOCIATE-RQ": _send(associate_rq()[:10]),
    "P-DATA 0xFFFFFFF0": _huge_pdata,
}


def open_flood(port: int, per_kind: int) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    lock = threading.Lock()

    def one(opener: Callable[[int], socket.socket]) -> None:
        try:
            sock = opener(port)
        except OSError:
            return
        with lock:
            sockets.append(sock)

    threads = [threading.Thread(target=one, args=(opener,)) for opener in KINDS.values() for _ in range(per_kind)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sockets


# -- a modality ------------------------------------------------------------

def timed_store(port: int, template: pydicom.Dataset) -> tuple[float, int]:
    ds = template.copy()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
    status = -1
    if assoc.is_established:
        rsp = assoc.send_c_store(ds)
        status = int(rsp.Status) if rsp else -1
        assoc.release()
    return time.perf_counter() - start, status


def node_cpu_seconds(pid: int) -> float:
    """The node process's CPU time so far (user + system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood_rounds(folder: Path, template: pydicom.Dataset, rounds: int, per_kind: int) -> dict[str, object]:
    proc, port = start_node(folder / "flood", max_associations=per_kind + 16, max_associations_per_host=0)
    times: dict[str, list[float]] = {"none": [], "flood": []}
    cpu: dict[str, list[float]] = {"none": [], "flood": []}
    try:
        timed_store(port, template)  # warm-up: first store opens the database, imports codecs
        for r in range(rounds):
            for mode in ("none", "flood"):
                sockets = open_flood(port, per_kind) if mode == "flood" else []
                cpu0 = node_cpu_seconds(proc.pid)
                seconds, status = timed_store(port, template)
                cpu[mode].append(node_cpu_seconds(proc.pid) - cpu0)
                for s in sockets:
                    s.close()
                times[mode].append(seconds)
                print(f"round {r + 1} {mode:5s}: C-STORE {seconds * 1000:7.1f} ms status 0x{status & 0xFFFF:04X}, "
                      f"node CPU {cpu[mode][-1] * 1000:.0f} ms"
                      + (f" ({len(sockets)} hostile sockets open)" if sockets else ""), flush=True)
                time.sleep(0.5)
    finally:
        stop_node(proc)
    none, flood = statistics.median(times["none"]), statistics.median(times["flood"])
    print(f"median C-STORE: no hostile peers {none * 1000:.1f} ms; {per_kind} of each of {len(KINDS)} kinds "
          f"{flood * 1000:.1f} ms (x{flood / none:.2f})")
    return {"per_kind": per_kind, "kinds": list(KINDS), "store_seconds": times, "node_cpu_seconds": cpu,
            "median_ms": {"none": none * 1000, "flood": flood * 1000}}


# -- oversize datasets -----------------------------------------------------

def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def oversize_peak(folder: Path, template: pydicom.Dataset, size_mb: int, streams: int,
                  cap_mb: int) -> dict[str, object]:
    proc, port = start_node(folder / f"cap{cap_mb}", max_dataset_mb=cap_mb, max_associations=streams + 4,
                            max_associations_per_host=0)
    try:
        timed_store(port, template)
        before = peak_rss_mb(proc.pid)
        big = template.copy()
        big.add_new(0x00091010, "LO", "CXRTRIAGE BENCH")
        big.add_new(0x00091011, "OB", bytes(size_mb * 1024 * 1024))
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(timed_store(port, big)[1])) for _ in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        after = peak_rss_mb(proc.pid)
    finally:
        stop_node(proc)
    answers = ", ".join(f"0x{s & 0xFFFF:04X} x{statuses.count(s)}" for s in sorted(set(statuses)))
    print(f"max_dataset_mb {cap_mb:4d}: {streams} x {size_mb} MB datasets at once in {seconds:.1f} s, "
          f"answers {answers}; node peak RSS {before:.0f} MB before, {after:.0f} MB after")
    return {"max_dataset_mb": cap_mb, "streams": streams, "dataset_mb": size_mb, "seconds": seconds,
            "answers": answers, "peak_rss_mb_before": before, "peak_rss_mb_after": after}


def bomb_peak(folder: Path, template: pydicom.Dataset, streams: int, inflated_mb: int) -> dict[str, object]:
    """``streams`` Deflated datasets that would inflate to ``inflated_mb`` each, at once, against the defaults."""
    from tests.bad_inputs import deflate_bomb
    from tests.harness import send_dataset_bytes

    proc, port = start_node(folder / "bomb", max_associations=streams + 4, max_associations_per_host=0)
    try:
        timed_store(port, template)
        before = peak_rss_mb(proc.pid)
        ds = template.copy()
        bombs = [deflate_bomb(ds, inflated_mb << 20) for _ in range(streams)]
        statuses: list[int | str] = []
        threads = [threading.Thread(target=lambda b=b: statuses.append(send_dataset_bytes(
            port, str(ds.SOPClassUID), str(generate_uid()), DeflatedExplicitVRLittleEndian, b))) for b in bombs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = peak_rss_mb(proc.pid)
    finally:
        stop_node(proc)
    answers = ", ".join(f"{a if isinstance(a, str) else hex(a)} x{statuses.count(a)}" for a in sorted(set(statuses), key=str))
    print(f"deflate bombs: {streams} x {len(bombs[0]) / 2**20:.1f} MB on the wire inflating to {inflated_mb} MB each, "
          f"answers {answers}; node peak RSS {before:.0f} MB before, {after:.0f} MB after")
    return {"streams": streams, "wire_mb": len(bombs[0]) / 2**20, "inflates_to_mb": inflated_mb, "answers": answers,
            "peak_rss_mb_before": before, "peak_rss_mb_after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hostile", type=int, default=32, help="sockets of each kind")
    parser.add_argument("--oversize-mb", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--skip-uncapped", action="store_true", help="only the capped node (saves ~1 GB of RAM)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        template = pydicom.dcmread(write_cr(PhantomGenerator(1024, 880)(1), folder / "template.dcm"))
        report["flood"] = flood_rounds(folder, template, args.rounds, args.hostile)
        report["deflate_bombs"] = bomb_peak(folder, template, args.streams, inflated_mb=1024)
        report["oversize_capped"] = oversize_peak(folder, template, args.oversize_mb, args.streams, cap_mb=8)
        if not args.skip_uncapped:
            report["oversize_uncapped"] = oversize_peak(folder, template, args.oversize_mb, args.streams,
                                                        cap_mb=args.oversize_mb * 2)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
