"""A bounded, seeded fuzzer over the node's receive path.

Two kinds of case, each a pure function of (seed, case number):

* **PDU cases**: an A-ASSOCIATE-RQ built byte by byte (PS3.8 9.3.2), then
  mutated: length fields set to 0, odd, huge or off by a few, items
  truncated, duplicated or given unknown types, bytes flipped, random
  garbage, a P-DATA-TF after the request. They go out on a raw socket; the
  answer (A-ASSOCIATE-AC / -RJ, A-ABORT, or a closed socket) is recorded.
* **Dataset cases**: a good CR's dataset bytes, mutated (bytes flipped,
  element lengths rewritten, VRs replaced, truncation, deeply nested
  sequences, garbage appended), sent in a C-STORE on a valid association
  under one of the transfer syntaxes the node accepts, so that the dataset
  parser, not the network layer, meets them.

``run`` interleaves good C-STOREs with the cases; the caller checks that
every good store succeeded and that nothing acknowledged was lost or altered.
Used briefly by tests/test_fuzz.py and for longer by bench/fuzz.py.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .harness import send_dataset_bytes

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# -- PDUs ---------------------------------------------------------------------


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(called: bytes = b"CXRTRIAGE", calling: bytes = b"FUZZER") -> bytes:
    """A valid A-ASSOCIATE-RQ proposing CR Image Storage, Explicit VR Little Endian (PS3.8 9.3.2)."""
    abstract = _item(0x30, CR_STORAGE.encode())
    transfer = _item(0x40, ExplicitVRLittleEndian.encode())
    presentation = _item(0x20, bytes([1, 0, 0, 0]) + abstract + transfer)
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT) + presentation + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(payload: bytes, context_id: int = 1, control: int = 0x03) -> bytes:
    """One P-DATA-TF with one PDV (PS3.8 9.3.5); control 0x03 = last fragment of a command."""
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _mutate_pdu(rng: random.Random, pdu: bytes) -> tuple[str, bytes]:
    data = bytearray(pdu)
    how = rng.choice(["pdu_length", "item_length", "truncate", "flip", "garbage", "unknown_item",
                      "pdu_type", "duplicate_item", "then_p_data", "empty_aet"])
    if how == "pdu_length":
        struct.pack_into(">I", data, 2, rng.choice([0, 1, 7, len(pdu) - 6 + rng.randint(-8, 8), 0xFFFFFFF0]))
    elif how == "item_length":  # the first variable item (application context) starts at 74
        offset = rng.choice([74, 74 + 4 + len(APPLICATION_CONTEXT)])
        struct.pack_into(">H", data, offset + 2, rng.choice([0, 1, 0xFFFF, rng.randint(0, 200)]))
    elif how == "truncate":
        data = data[:rng.randint(1, len(data) - 1)]
    elif how == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "garbage":
        data = bytearray(rng.randbytes(rng.randint(1, 512)))
    elif how == "unknown_item":
        data += _item(rng.choice([0x00, 0x33, 0x7F, 0xFF]), rng.randbytes(rng.randint(0, 64)))
        struct.pack_into(">I", data, 2, len(data) - 6)
    elif how == "pdu_type":
        data[0] = rng.choice([0x00, 0x02, 0x03, 0x05, 0x06, 0x07, 0x08, 0x7F, 0xFF])
    elif how == "duplicate_item":
        data += data[74:74 + 4 + len(APPLICATION_CONTEXT)] * rng.randint(1, 50)
        struct.pack_into(">I", data, 2, len(data) - 6)
    elif how == "then_p_data":
        data += p_data(rng.randbytes(rng.randint(0, 256)), context_id=rng.choice([1, 3, 255]))
    elif how == "empty_aet":
        data[10:42] = b" " * 32
    return how, bytes(data)


def send_pdu(port: int, data: bytes, timeout: float) -> str:
    """Send raw bytes and report the first answer: the PDU type, 'closed', or 'silent'."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            first = sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
        except TimeoutError:
            return "silent"
    return {b"": "closed", b"\x02": "A-ASSOCIATE-AC", b"\x03": "A-ASSOCIATE-RJ",
            b"\x07": "A-ABORT"}.get(first, f"PDU 0x{first.hex()}")


# -- datasets -----------------------------------------------------------------


def dataset_bytes(path: Path, transfer_syntax: str, sop_instance_uid: str | None = None) -> bytes:
    ds = pydicom.dcmread(path)
    if sop_instance_uid:
        ds.SOPInstanceUID = sop_instance_uid
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _nested_sequence(depth: int) -> bytes:
    """(0040,A730) Content Sequence nested ``depth`` deep, undefined lengths (explicit VR LE)."""
    item_start, item_end, seq_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", \
        b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    sequence_start = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"
    return (sequence_start + item_start) * depth + (item_end + seq_end) * depth


def _mutate_dataset(rng: random.Random, data: bytes, explicit: bool) -> tuple[str, bytes]:
    buf = bytearray(data)
    how = rng.choice(["flip", "length", "vr", "truncate", "nested", "garbage_tail", "zero_run", "swap_tags"])
    if how == "flip":
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif how == "length":  # rewrite a 4-byte field at a random even offset in the header
        offset = rng.randrange(0, min(len(buf) - 4, 2048)) & ~1
        struct.pack_into("<I", buf, offset, rng.choice([0, 1, 3, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFF0, len(buf) * 4]))
    elif how == "vr" and explicit:
        offset = rng.randrange(0, min(len(buf) - 2, 2048))
        buf[offset:offset + 2] = rng.choice([b"SQ", b"UN", b"OB", b"ZZ", b"\x00\x00", b"UT", b"OW"])
    elif how == "truncate":
        buf = buf[:rng.randint(0, len(buf) - 1)]
    elif how == "nested":
        buf[0:0] = _nested_sequence(rng.choice([2, 64, 400]))
    elif how == "garbage_tail":
        buf += rng.randbytes(rng.randint(1, 4096))
    elif how == "zero_run":
        start = rng.randrange(len(buf))
        buf[start:start + rng.randint(1, 512)] = bytes(min(512, len(buf) - start))
    else:  # swap_tags: two header elements' first bytes exchanged (out-of-order tags)
        a, b = sorted(rng.sample(range(0, min(len(buf), 1024), 2), 2))
        buf[a:a + 2], buf[b:b + 2] = buf[b:b + 2], buf[a:a + 2]
    return how, bytes(buf)


def c_store_bytes(port: int, sop_instance_uid: str, transfer_syntax: str, data: bytes, timeout: float) -> int | str:
    """C-STORE ``data`` as a CR's dataset, unparsed."""
    return send_dataset_bytes(port, CR_STORAGE, sop_instance_uid, transfer_syntax, data, calling_aet="FUZZER",
                              timeout=timeout)


# -- the run ------------------------------------------------------------------


@dataclass
class Outcome:
    case: int
    kind: str  # pdu | dataset | good
    mutation: str
    answer: int | str
    sop_instance_uid: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def good(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "good"]

    def acknowledged(self) -> list[Outcome]:
        """Fuzzed datasets the node answered with Success or a warning (it keeps them)."""
        return [o for o in self.outcomes if o.kind == "dataset" and isinstance(o.answer, int)
                and (o.answer == 0 or o.answer >> 12 == 0xB)]

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            key = f"{o.kind}:{o.answer if isinstance(o.answer, str) else hex(o.answer)}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))


def cases(seed: int, count: int) -> Iterator[tuple[int, random.Random]]:
    for case in range(count):
        yield case, random.Random(seed * 1_000_003 + case)


def run(port: int, good_cr: Path, make_good: Callable[[int], Path], *, seed: int, count: int,
        good_every: int = 10, timeout: float = 5.0) -> Report:
    """``count`` seeded cases, alternating PDU and dataset cases, a good C-STORE every ``good_every``."""
    report = Report()
    root = f"1.2.826.0.1.3680043.10.997.{seed}"
    for case, rng in cases(seed, count):
        if case % 2 == 0:
            how, data = _mutate_pdu(rng, associate_rq())
            report.outcomes.append(Outcome(case, "pdu", how, send_pdu(port, data, timeout)))
        else:
            ts = rng.choice(TRANSFER_SYNTAXES)
            uid = f"{root}.{case}"
            how, data = _mutate_dataset(rng, dataset_bytes(good_cr, ts, uid), explicit=ts == ExplicitVRLittleEndian)
            report.outcomes.append(Outcome(case, "dataset", f"{how}/{ts.name}",
                                           c_store_bytes(port, uid, ts, data, timeout), uid))
        if case % good_every == good_every - 1:
            good = make_good(case)
            uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
            ts = ExplicitVRLittleEndian
            report.outcomes.append(Outcome(case, "good", "", c_store_bytes(port, uid, ts, dataset_bytes(good, ts),
                                                                           timeout), uid))
    return report
