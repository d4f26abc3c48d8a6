"""Hostile peers cannot starve the receive path (cxrtriage/scp/guard.py).

The real node runs as ``cxrtriage serve``; hostile peers are raw sockets.
Timeouts are small so that every test takes seconds: the node must close
each hostile socket within them while a modality still stores an image.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .harness import NodeProcess, wait_for

pytestmark = pytest.mark.slow

HANDSHAKE_TIMEOUT = 2.0
PDU_TIMEOUT = 2.0
#: How long after its last byte the node may take to close a hostile socket (scheduling slack on a busy machine).
CLOSE_WITHIN = max(HANDSHAKE_TIMEOUT, PDU_TIMEOUT) + 6.0
HOSTILE = 32
CLIENT_TIMEOUT = 5.0
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


# -- raw peers -------------------------------------------------------------

def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(calling: str = "HOSTILE", called: str = "CXRTRIAGE", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ for Verification (PS3.8 9.3.2), built byte by byte."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT_LE.encode())
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999")
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, context) + _item(0x50, user))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT, source_address=(source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # no TIME_WAIT pile-up
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the next PDU, or (0, b"") at EOF."""
    header = _read(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read(sock, length)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def associate(port: int, source: str = "127.0.0.1", **rq: str) -> tuple[socket.socket, int]:
    """A raw association: the socket and the answer's PDU type (2 A-ASSOCIATE-AC, 3 -RJ, 7 A-ABORT, 0 EOF)."""
    sock = connect(port, source)
    sock.sendall(associate_rq(**rq))
    pdu_type, _ = read_pdu(sock)
    return sock, pdu_type


def closed_by_node(sock: socket.socket, within: float) -> bool:
    """The node closes the socket (EOF or reset) within ``within`` seconds; PDUs it sends first are skipped."""
    deadline = time.monotonic() + within
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def random_bytes(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(os.urandom(512))
    return sock


def http_request(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def huge_associate_rq(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\x00\x01\x00\x00")
    return sock


def idle(port: int) -> socket.socket:
    return connect(port)


def slow_drip(port: int) -> socket.socket:
    """The first bytes of an A-ASSOCIATE-RQ; the rest follows a byte at a time (drip)."""
    sock = connect(port)
    sock.sendall(associate_rq()[:10])
    return sock


def associated(port: int) -> socket.socket:
    sock, answer = associate(port)
    assert answer == 0x02, f"association not accepted: PDU type {answer}"
    return sock


def open_all(opener: Callable[[int], socket.socket], port: int, count: int) -> list[socket.socket]:
    """``count`` sockets opened in parallel, as a flood would."""
    sockets: list[socket.socket] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            sockets.append(opener(port))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return sockets


def drip(sockets: list[socket.socket], data: bytes, stop: threading.Event, every: float) -> None:
    """``data`` one byte every ``every`` seconds on each socket until ``stop`` (or the node closes it)."""
    for i in range(len(data)):
        if stop.wait(every):
            return
        for sock in sockets:
            try:
                sock.send(data[i:i + 1])
            except OSError:
                pass


def dripping(sockets: list[socket.socket], data: bytes, every: float) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=drip, args=(sockets, data, stop, every))
    thread.start()
    return thread, stop


# -- a modality ------------------------------------------------------------

def store(port: int, path: Path, ssl_context: ssl.SSLContext | None = None, source: str = "127.0.0.1") -> int | None:
    """C-STORE ``path`` as a modality would, every timeout 5 s; the status, or None without an association."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="MODALITY")
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, attr, CLIENT_TIMEOUT)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE", bind_address=(source, 0),
                         tls_args=(ssl_context, "127.0.0.1") if ssl_context else None)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if status else None
    finally:
        assoc.release()


def echo(port: int, ssl_context: ssl.SSLContext | None = None) -> bool:
    ae = AE(ae_title="MODALITY")
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, attr, CLIENT_TIMEOUT)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE",
                         tls_args=(ssl_context, "127.0.0.1") if ssl_context else None)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


# -- nodes -----------------------------------------------------------------

@contextmanager
def _node(folder: Path, **dicom: object) -> Iterator[NodeProcess]:
    settings: dict[str, object] = {"handshake_timeout": HANDSHAKE_TIMEOUT, "pdu_timeout": PDU_TIMEOUT,
                                   "max_dataset_mb": 2, **dicom}
    node = NodeProcess(folder, f"sqlite:///{folder / 'node.db'}", workers={"scoring_workers": 0}, dicom=settings)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def flood_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """Room for 32 hostile associations plus the modality's."""
    with _node(tmp_path_factory.mktemp("flood"), max_associations=40, max_associations_per_host=0) as node:
        yield node


@pytest.fixture(scope="module")
def limited_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with _node(tmp_path_factory.mktemp("limited"), max_associations=4, max_associations_per_host=2,
               allowed_calling_aets=["HOSTILE", "MODALITY"], require_called_aet=True) as node:
        yield node


# -- tests -----------------------------------------------------------------

@pytest.mark.parametrize("opener", [random_bytes, http_request, huge_associate_rq, idle], ids=lambda f: f.__name__)
def test_store_succeeds_while_hostile_sockets_are_open(
    flood_node: NodeProcess, phantom_cr: Path, opener: Callable[[int], socket.socket]
) -> None:
    sockets = open_all(opener, flood_node.port, HOSTILE)
    try:
        assert store(flood_node.port, phantom_cr) == 0x0000
        assert all(closed_by_node(s, CLOSE_WITHIN) for s in sockets)
    finally:
        close_all(sockets)


def test_store_succeeds_while_peers_drip_an_associate_request(flood_node: NodeProcess, phantom_cr: Path) -> None:
    sockets = open_all(slow_drip, flood_node.port, HOSTILE)
    dripper, stop = dripping(sockets, associate_rq()[10:], HANDSHAKE_TIMEOUT / 4)
    try:
        assert store(flood_node.port, phantom_cr) == 0x0000
        # Bytes keep coming, but the whole A-ASSOCIATE-RQ did not come within handshake_timeout.
        assert all(closed_by_node(s, CLOSE_WITHIN) for s in sockets)
    finally:
        stop.set()
        dripper.join()
        close_all(sockets)
    assert "handshake timeout" in flood_node.log


def test_huge_pdata_after_association_is_aborted_and_closed(flood_node: NodeProcess, phantom_cr: Path) -> None:
    sockets = open_all(associated, flood_node.port, HOSTILE)
    try:
        for sock in sockets:
            sock.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + b"\x00" * 64)
        assert store(flood_node.port, phantom_cr) == 0x0000
        answers = [read_pdu(s)[0] for s in sockets]
        assert answers == [0x07] * HOSTILE  # A-ABORT ...
        assert all(closed_by_node(s, CLOSE_WITHIN) for s in sockets)  # ... then the node closes
    finally:
        close_all(sockets)
    assert '"reason": "PDU too large"' in flood_node.log


def test_pdata_dripped_a_byte_at_a_time_is_aborted(flood_node: NodeProcess, phantom_cr: Path) -> None:
    sockets = open_all(associated, flood_node.port, 4)
    try:
        for sock in sockets:
            sock.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00")  # 1 of 1000 declared bytes
        dripper, stop = dripping(sockets, bytes(999), PDU_TIMEOUT / 4)
        try:
            assert store(flood_node.port, phantom_cr) == 0x0000
            assert all(closed_by_node(s, CLOSE_WITHIN) for s in sockets)
        finally:
            stop.set()
            dripper.join()
    finally:
        close_all(sockets)
    assert '"reason": "PDU timeout"' in flood_node.log


def test_hostile_rejections_name_their_reason(flood_node: NodeProcess) -> None:
    """Each rejection is provoked here: under xdist the tests above may run on another worker's node."""
    for opener, reason in ((http_request, "garbage: not a DICOM PDU"), (huge_associate_rq, "PDU too large"),
                           (idle, "handshake timeout")):
        (sock,) = open_all(opener, flood_node.port, 1)
        try:
            assert closed_by_node(sock, CLOSE_WITHIN), reason
        finally:
            sock.close()
        line = f'"msg": "association rejected", "reason": "{reason}", "address": "127.0.0.1"'
        wait_for(lambda: line in flood_node.log, 10, f"the log line of {reason!r}")  # noqa: B023 - called at once


def test_oversized_dataset_is_refused_with_out_of_resources(
    flood_node: NodeProcess, phantom_cr: Path, tmp_path: Path
) -> None:
    big = pydicom.dcmread(phantom_cr)
    big.add_new(0x00091010, "LO", "CXRTRIAGE TEST")
    big.add_new(0x00091011, "OB", os.urandom(3 * 1024 * 1024))  # 1.8 MB image + 3 MB > max_dataset_mb 2
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.9999.11"
    path = tmp_path / "big.dcm"
    big.save_as(path)
    assert store(flood_node.port, path) == 0xA700
    assert '"reason": "dataset larger than max_dataset_mb"' in flood_node.log
    assert store(flood_node.port, phantom_cr) == 0x0000  # the cap is per dataset, the image itself fits
    with flood_node.db().session() as session:
        from sqlalchemy import select

        from cxrtriage.storage.models import Instance

        stored = session.scalars(select(Instance.sop_instance_uid)).all()
    assert big.SOPInstanceUID not in stored


def test_a_burst_of_max_associations_is_all_accepted(limited_node: NodeProcess) -> None:
    sources = ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]  # 4 = max_associations, 2 per host
    results: list[tuple[socket.socket, int]] = []
    barrier = threading.Barrier(len(sources))

    def one(source: str) -> None:
        barrier.wait()
        results.append(associate(limited_node.port, source))

    threads = [threading.Thread(target=one, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(answer for _, answer in results) == [0x02] * len(sources)
        extra, answer = associate(limited_node.port, "127.0.0.4")
        extra.close()
        assert answer == 0x03  # A-ASSOCIATE-RJ: local limit exceeded
    finally:
        close_all([s for s, _ in results])
    assert '"reason": "too many associations", "address": "127.0.0.4"' in limited_node.log
    # Slots come back once the peers have gone.
    wait_for(lambda: echo(limited_node.port), 10, "a free association slot")


def test_associations_per_host_are_limited(limited_node: NodeProcess) -> None:
    held = [associate(limited_node.port, "127.0.0.5") for _ in range(2)]
    try:
        assert [answer for _, answer in held] == [0x02, 0x02]
        third, answer = associate(limited_node.port, "127.0.0.5")
        third.close()
        assert answer == 0x03
        other, answer = associate(limited_node.port, "127.0.0.6")  # another host still gets in
        other.close()
        assert answer == 0x02
    finally:
        close_all([s for s, _ in held])
    assert '"reason": "too many associations from one host", "address": "127.0.0.5"' in limited_node.log


def test_ae_title_rejections_name_their_reason(limited_node: NodeProcess) -> None:
    sock, answer = associate(limited_node.port, "127.0.0.7", calling="INTRUDER")
    sock.close()
    assert answer == 0x03
    sock, answer = associate(limited_node.port, "127.0.0.7", called="SOMEONEELSE")
    sock.close()
    assert answer == 0x03

    def logged() -> bool:
        log = limited_node.log
        return ('"reason": "calling AE title not allowed", "calling_aet": "INTRUDER"' in log
                and '"reason": "called AE title wrong"' in log)

    wait_for(logged, 10, "both rejections in the log")


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (made in memory)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_idle_plain_tcp_does_not_block_tls(tmp_path: Path, phantom_cr: Path) -> None:
    from .test_node_security import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"enabled": True, "certificate": str(pki["server.pem"]), "private_key": str(pki["server.key"]),
           "ca_certificates": str(pki["ca.pem"])}
    with _node(tmp_path / "node", tls=tls, max_associations=8) as node:
        trusted = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        trusted.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        sockets = open_all(idle, node.port, HOSTILE)  # TCP connected, no ClientHello
        slow = open_all(idle, node.port, 4)  # a ClientHello a byte at a time
        dripper, stop = dripping(slow, client_hello(), HANDSHAKE_TIMEOUT / 4)
        try:
            assert echo(node.port, trusted)
            assert store(node.port, phantom_cr, trusted) == 0x0000
            assert all(closed_by_node(s, CLOSE_WITHIN) for s in sockets + slow)
        finally:
            stop.set()
            dripper.join()
            close_all(sockets + slow)
        assert '"reason": "handshake timeout"' in node.log


# -- the guard's parts, without a node -------------------------------------

def _pdata(*pdvs: tuple[int, bytes]) -> bytes:
    """P-DATA-TF of (message control header, fragment) PDVs on presentation context 1."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, 1, control) + data for control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _fragments(pdu: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 6
    while offset < len(pdu):
        (length,) = struct.unpack_from(">L", pdu, offset)
        out.append((pdu[offset + 5], pdu[offset + 6:offset + 4 + length]))
        offset += 4 + length
    return out


def test_dataset_fragments_past_the_cap_are_dropped() -> None:
    from cxrtriage.scp.guard import DatasetBudget, limit_datasets

    budget = DatasetBudget(limit=10)
    first = _pdata((0x03, b"command"), (0x00, b"x" * 8))
    assert limit_datasets(first, budget) is first  # 8 bytes: within the cap, untouched (not even copied)
    cut = limit_datasets(_pdata((0x00, b"y" * 8), (0x02, b"z" * 8)), budget)
    assert _fragments(cut) == [(0x00, b"yyy"), (0x02, b"")]  # 11 bytes kept in all; last-fragment flag kept
    assert budget.dropped
    again = _pdata((0x03, b"command"), (0x02, b"w" * 10))  # a new message starts a new budget
    assert limit_datasets(again, budget) == again


def test_pending_connections_evict_the_busiest_peers_oldest() -> None:
    from cxrtriage.scp.guard import PendingConnections

    pending = PendingConnections(cap=3)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        a1 = pending.add("10.0.0.1", pairs[0][0])
        pending.add("10.0.0.1", pairs[1][0])
        pending.add("10.0.0.2", pairs[2][0])
        pending.add("10.0.0.2", pairs[3][0])  # full: the oldest of 10.0.0.1 (2 pending, first) goes
        assert a1.evicted and len(pending) == 3
        pairs[0][1].settimeout(1)
        assert pairs[0][1].recv(1) == b""  # its peer sees the connection end
    finally:
        for left, right in pairs:
            left.close()
            right.close()
