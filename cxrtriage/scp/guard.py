"""Receive-path guard: no peer can hold the node's association slots.

pynetdicom (3.0) reads a PDU's declared length with no maximum and no
deadline, runs the TLS handshake on its accept thread, counts sockets that
never sent an A-ASSOCIATE-RQ against ``maximum_associations`` and leaves
the transport open after an A-ABORT. This module puts a guard in front:

* before any pynetdicom ``Association`` exists, a handler thread does the
  TLS handshake and reads the whole A-ASSOCIATE-RQ (PS3.8 9.3.2) within
  ``handshake_timeout``; anything else is refused and the socket closed;
* only then is the association admitted against ``max_associations`` and
  ``max_associations_per_host``, or refused with A-ASSOCIATE-RJ
  transient / local-limit-exceeded (PS3.8 9.3.4);
* the established association reads whole PDUs through ``GuardedSocket``:
  each within ``pdu_timeout`` of its first byte, its declared length
  capped before a byte of the body is buffered (PS3.8 9.3.5 P-DATA-TF),
  and dataset fragments past ``max_dataset_mb`` dropped, so the C-STORE
  can be answered 0xA700 (``oversized_dataset``).

pynetdicom hooks used, all explicit: ``ApplicationEntity.make_server``
(``server_class``, ``request_handler``), ``AssociationServer.get_request``,
``RequestHandler.handle``/``_create_association``, and the DUL's reads
through ``AssociationSocket.ready``/``recv`` (header of 6 bytes, then the
body).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from ..config import DicomSettings
from ..observability import event

log = logging.getLogger(__name__)

#: Largest A-ASSOCIATE-RQ read: 128 presentation contexts with long UIDs and a
#: user identity token fit in a few kB.
MAX_ASSOCIATE_RQ = 64 * 1024
#: Largest PDU other than P-DATA-TF once associated (release and abort are 10 bytes).
MAX_CONTROL_PDU = 64 * 1024
#: Allowed over our maximum PDU length: peers differ on whether it counts PDV headers.
PDU_SLACK = 64 * 1024
#: P-DATA-TF cap when ``maximum_pdu_size`` is 0 (unlimited in pynetdicom's terms).
UNLIMITED_PDU_CAP = 64 * 1024 * 1024
#: Sockets that have not yet completed an A-ASSOCIATE-RQ, all peers together;
#: when full, the oldest socket of the peer with most of them is dropped.
MAX_PENDING = 256

# PDU types, PS3.8 9.3.1.
ASSOCIATE_RQ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x01, 0x04, 0x05, 0x06, 0x07
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
# A-ABORT reasons when the service provider (source 2) aborts, PS3.8 Table 9-26.
REASON_NOT_SPECIFIED, UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x00, 0x01, 0x02, 0x06
#: A-ASSOCIATE-RQ fixed part: version, reserved, called AE, calling AE, reserved (PS3.8 Table 9-11).
RQ_FIXED_LENGTH = 2 + 2 + 16 + 16 + 32


def abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (PS3.8 9.3.8)."""
    return struct.pack(">BBLBBBB", ABORT, 0, 4, 0, 0, 0x02, reason)


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, diagnostic)


#: A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local-limit-exceeded.
LOCAL_LIMIT_EXCEEDED = reject_pdu(0x02, 0x03, 0x02)


@dataclass(frozen=True)
class Limits:
    """The receive-path limits, from ``dicom:`` in config.yaml."""

    handshake_timeout: float
    pdu_timeout: float
    max_associations: int
    max_associations_per_host: int  # 0 = no limit
    max_pdata_length: int
    max_dataset_bytes: int

    @classmethod
    def from_settings(cls, settings: DicomSettings) -> Limits:
        pdu = settings.maximum_pdu_size
        return cls(
            handshake_timeout=settings.handshake_timeout,
            pdu_timeout=settings.pdu_timeout,
            max_associations=settings.max_associations,
            max_associations_per_host=settings.max_associations_per_host,
            max_pdata_length=pdu + PDU_SLACK if pdu else UNLIMITED_PDU_CAP,
            max_dataset_bytes=settings.max_dataset_mb * 1024 * 1024,
        )


#: Why the guard refused or dropped a connection (its log ``reason``) -> the label of
#: ``cxrtriage_associations_rejected_total``; a fixed set, so the metric's cardinality stays bounded.
REJECTION_LABELS: dict[str, str] = {
    "handshake timeout": "handshake_timeout",
    "PDU too large": "pdu_too_large",
    "PDU timeout": "slow_pdu",
    "garbage: not an A-ASSOCIATE-RQ": "not_dicom",
    "garbage: not a DICOM PDU": "not_dicom",
    "garbage: undecodable A-ASSOCIATE-RQ": "not_dicom",
    "too many associations": "max_associations",
    "too many associations from one host": "per_host_limit",
    "too many pending connections": "pending_limit",
}
#: Called with the metric label of each refused or dropped association.
OnRejected = Callable[[str], None]
#: Called with the metric label of each failed TLS handshake.
OnTLSFailure = Callable[[str], None]


def rejection_label(reason: str) -> str:
    """The metric label of a logged refusal reason (``tls_handshake`` for every TLS failure)."""
    if reason.startswith("TLS handshake failed"):
        return "tls_handshake"
    return REJECTION_LABELS.get(reason, "other")


def tls_failure_label(error: BaseException) -> str:
    """``no_client_certificate``, ``bad_certificate``, ``timeout`` or ``protocol`` (OpenSSL's reason codes)."""
    if isinstance(error, (TimeoutError, socket.timeout)):  # noqa: UP041
        return "timeout"
    reason = str(getattr(error, "reason", "") or "").upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
        return "no_client_certificate"
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason or "CERT" in reason:
        return "bad_certificate"
    return "protocol"


def _ignore(label: str) -> None:
    """The default counter: nothing counted (tests and tools that start a bare server)."""


class Refused(Exception):
    """A connection or association the guard ends: why, and the A-ABORT reason to send (None: just close)."""

    def __init__(self, reason: str, abort: int | None = None, level: int = logging.WARNING) -> None:
        super().__init__(reason)
        self.reason = reason
        self.abort = abort
        self.level = level


def _fill(sock: socket.socket, view: memoryview, deadline: float, late: str) -> None:
    """Fill ``view`` from ``sock`` before ``deadline`` (monotonic), else Refused(late); EOF is Refused too."""
    size = len(view)
    got = 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused(late)
        sock.settimeout(remaining)
        try:
            n = sock.recv_into(view[got:], min(size - got, 1 << 20))
        except (TimeoutError, socket.timeout):  # noqa: UP041 - ssl raises socket.timeout
            raise Refused(late) from None
        except OSError as error:
            raise Refused(f"connection error: {error.__class__.__name__}", level=logging.INFO) from None
        if n == 0:
            raise Refused("closed by the peer mid-PDU" if got else "closed by the peer", level=logging.INFO)
        got += n


def read_exact(sock: socket.socket, size: int, deadline: float, late: str) -> bytearray:
    """``size`` bytes before ``deadline`` (monotonic), else Refused(late); EOF is Refused too."""
    buffer = bytearray(size)
    _fill(sock, memoryview(buffer), deadline, late)
    return buffer


def read_pdu(sock: socket.socket, deadline: float, cap: Callable[[int], int], late: str) -> bytearray:
    """One whole PDU; its declared length is checked against ``cap(type)`` before the body is read.

    The body is received straight into the PDU's one buffer, and the DUL reads views of it
    (:meth:`GuardedSocket.recv`): every copy here was another pass over each 10 MB image.
    """
    header = read_exact(sock, 6, deadline, late)
    pdu_type, _, length = struct.unpack(">BBL", header)
    if length > cap(pdu_type):
        raise Refused("PDU too large", abort=INVALID_PARAMETER)
    pdu = bytearray(6 + length)
    pdu[:6] = header
    _fill(sock, memoryview(pdu)[6:], deadline, late)
    return pdu


def associate_rq_cap(pdu_type: int) -> int:
    """Before association only an A-ASSOCIATE-RQ may come (PS3.8 9.2 state Sta2)."""
    if pdu_type == ASSOCIATE_RQ:
        return MAX_ASSOCIATE_RQ
    if pdu_type in KNOWN_PDU_TYPES:
        raise Refused("garbage: not an A-ASSOCIATE-RQ", abort=UNEXPECTED_PDU)
    raise Refused("garbage: not a DICOM PDU", abort=UNRECOGNISED_PDU)


def ae_title(raw: bytes | bytearray) -> str:
    """An AE title field as printable text (a peer may send anything)."""
    return raw.decode("ascii", "replace").strip(" \x00")


def limit_datasets(pdu: bytearray, state: DatasetBudget) -> bytearray:
    """P-DATA-TF with dataset fragments past the budget emptied (PS3.8 9.3.5, PS3.8 E.2).

    Command fragments reset the budget (a new message). A dataset keeps at
    most ``max_dataset_bytes + 1`` bytes, so the C-STORE handler sees that
    it was larger than allowed; the last-fragment flag is always kept.
    ``pdu`` itself comes back when nothing is cut (the usual case: no copy).
    """
    view = memoryview(pdu)
    items: list[bytes | memoryview] = []
    changed = False
    offset = 6
    while offset + 6 <= len(pdu):
        (length,) = struct.unpack_from(">L", pdu, offset)
        end = offset + 4 + length
        if length < 2 or end > len(pdu):
            return pdu  # malformed: pynetdicom's decoder refuses it
        context_id, control = pdu[offset + 4], pdu[offset + 5]
        fragment_start = offset + 6
        if control & 0x01:
            state.received = 0
            state.dropped = False
            items.append(view[offset:end])
        else:
            size = end - fragment_start
            keep = max(0, min(size, state.limit + 1 - state.received))
            state.received += size
            if keep < size:
                changed = True
                state.dropped = True
                items.append(struct.pack(">LBB", keep + 2, context_id, control))
                items.append(view[fragment_start:fragment_start + keep])
            else:
                items.append(view[offset:end])
        offset = end
    if not changed:
        return pdu
    body = b"".join(items)
    return bytearray(struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body)


@dataclass
class DatasetBudget:
    """Bytes of the current message's dataset seen so far."""

    limit: int
    received: int = 0
    dropped: bool = False


def oversized_dataset(dataset: Any, limit_bytes: int) -> bool:
    """True when a received dataset (a BytesIO) is larger than the cap, i.e. the guard cut it."""
    return dataset is not None and dataset.getbuffer().nbytes > limit_bytes


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket wrapper reading whole PDUs with a deadline and a length cap.

    The DUL reads a PDU as ``recv(6)`` then ``recv(length)``; here the first
    call reads and checks the whole PDU and later calls are served from it.
    """

    limits: Limits
    peer: str
    on_rejected: OnRejected
    _buffer: bytearray  # the PDU being read
    _offset: int  # how much of it the DUL has read
    _budget: DatasetBudget

    @classmethod
    def adopt(cls, plain: AssociationSocket, limits: Limits, peer: str, first_pdu: bytearray,
              on_rejected: OnRejected = _ignore) -> GuardedSocket:
        """Take over a fresh AssociationSocket (its state, not a second Evt5)."""
        guarded = cls.__new__(cls)
        guarded.__dict__.update(plain.__dict__)
        guarded.limits = limits
        guarded.peer = peer
        guarded.on_rejected = on_rejected
        guarded._buffer = first_pdu
        guarded._offset = 0
        guarded._budget = DatasetBudget(limits.max_dataset_bytes)
        if guarded.socket is not None:
            guarded.socket.settimeout(limits.pdu_timeout)  # a peer that stops reading cannot block a send
        return guarded

    @property
    def ready(self) -> bool:
        return self._offset < len(self._buffer) or super().ready

    def recv(self, nr_bytes: int) -> memoryview:  # type: ignore[override]
        """The next ``nr_bytes`` of the current PDU, as a view: the DUL only appends it to its own bytearray."""
        if self._offset >= len(self._buffer):
            self._buffer, self._offset = self._next_pdu(), 0
        chunk = memoryview(self._buffer)[self._offset:self._offset + nr_bytes]
        self._offset += len(chunk)
        if self._offset >= len(self._buffer):  # read to the end: an idle association holds no PDU
            self._buffer, self._offset = bytearray(), 0
        return chunk

    def _cap(self, pdu_type: int) -> int:
        if pdu_type == P_DATA_TF:
            return self.limits.max_pdata_length
        if pdu_type in KNOWN_PDU_TYPES:
            return MAX_CONTROL_PDU
        raise Refused("garbage: not a DICOM PDU", abort=UNRECOGNISED_PDU)

    def _next_pdu(self) -> bytearray:
        """The next whole PDU, or an empty one (the DUL then sees the transport closed, Evt17)."""
        sock = self.socket
        if sock is None:
            return bytearray()
        try:
            pdu = read_pdu(sock, time.monotonic() + self.limits.pdu_timeout, self._cap, "PDU timeout")
        except Refused as refused:
            if refused.level >= logging.WARNING:
                event(log, logging.WARNING, "association aborted", reason=refused.reason, address=self.peer)
                self.on_rejected(rejection_label(refused.reason))
            self._drop(refused.abort)
            return bytearray()
        finally:
            if self.socket is not None:
                self._settimeout(self.limits.pdu_timeout)
        if pdu[0] == P_DATA_TF:
            before = self._budget.dropped
            pdu = limit_datasets(pdu, self._budget)
            if self._budget.dropped and not before:
                event(log, logging.WARNING, "dataset fragments dropped", reason="dataset larger than max_dataset_mb",
                      address=self.peer, limit_mb=self.limits.max_dataset_bytes // (1024 * 1024))
        return pdu

    def _settimeout(self, seconds: float) -> None:
        try:
            if self.socket is not None:
                self.socket.settimeout(seconds)
        except OSError:
            pass

    def _drop(self, abort: int | None) -> None:
        """Send A-ABORT when there is a reason to give, then close the transport."""
        sock = self.socket
        if sock is not None:
            if abort is not None:
                try:
                    sock.settimeout(1.0)
                    sock.sendall(abort_pdu(abort))
                except OSError:
                    pass
            self._shutdown_socket()
        # The DUL must not select() on the closed socket (Evt17 in Sta1 is invalid).
        self._is_connected = False


class Admission:
    """Counts admitted associations, in all and per peer address."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.total = 0
        self.per_host: dict[str, int] = {}

    def admit(self, host: str) -> str | None:
        """None and a slot taken, or why not."""
        with self.lock:
            if self.total >= self.limits.max_associations:
                return "too many associations"
            per_host = self.limits.max_associations_per_host
            if per_host and self.per_host.get(host, 0) >= per_host:
                return "too many associations from one host"
            self.total += 1
            self.per_host[host] = self.per_host.get(host, 0) + 1
            return None

    def release(self, host: str) -> None:
        with self.lock:
            self.total -= 1
            left = self.per_host.get(host, 1) - 1
            if left:
                self.per_host[host] = left
            else:
                self.per_host.pop(host, None)


@dataclass(eq=False)
class Pending:
    """A socket that has not completed its A-ASSOCIATE-RQ yet."""

    host: str
    sock: socket.socket
    since: float = field(default_factory=time.monotonic)
    evicted: bool = False


class PendingConnections:
    """Sockets before association; when full the oldest one of the busiest peer is closed."""

    def __init__(self, cap: int = MAX_PENDING) -> None:
        self.cap = cap
        self.lock = threading.Lock()
        self.entries: list[Pending] = []

    def add(self, host: str, sock: socket.socket) -> Pending:
        entry = Pending(host, sock)
        with self.lock:
            if len(self.entries) >= self.cap:
                counts: dict[str, int] = {}
                for e in self.entries:
                    counts[e.host] = counts.get(e.host, 0) + 1
                busiest = max(counts, key=lambda h: counts[h])
                victim = min((e for e in self.entries if e.host == busiest), key=lambda e: e.since)
                self.entries.remove(victim)
                victim.evicted = True
                try:
                    victim.sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and cleans up
                except OSError:
                    pass
            self.entries.append(entry)
        return entry

    def remove(self, entry: Pending) -> None:
        with self.lock:
            if entry in self.entries:
                self.entries.remove(entry)

    def __len__(self) -> int:
        return len(self.entries)


class GuardedRequestHandler(RequestHandler):
    """One accepted connection: handshake and A-ASSOCIATE-RQ under a deadline, admission, association."""

    server: GuardedServer

    def handle(self) -> None:
        server = self.server
        host = str(self.client_address[0])
        sock: socket.socket = self.request
        entry = server.pending.add(host, sock)
        try:
            sock, first_pdu = self._handshake(sock, entry)
        except Refused as refused:
            if entry.evicted or refused.level >= logging.WARNING:
                reason = "too many pending connections" if entry.evicted else refused.reason
                event(log, logging.WARNING, "association rejected", reason=reason, address=host)
                server.on_rejected(rejection_label(reason))
            else:
                event(log, logging.INFO, "connection ended before association", reason=refused.reason, address=host)
            _close(entry.sock, abort_pdu(refused.abort) if refused.abort is not None else None)
            return
        finally:
            server.pending.remove(entry)
        self.request = sock
        calling = ae_title(first_pdu[26:42])
        refusal = server.admission.admit(host)
        if refusal:
            event(log, logging.WARNING, "association rejected", reason=refusal, address=host, calling_aet=calling)
            server.on_rejected(rejection_label(refusal))
            _close(sock, LOCAL_LIMIT_EXCEEDED)
            return
        try:
            assoc = self._create_association()
            assoc.dul.socket = GuardedSocket.adopt(
                assoc.dul.socket, server.limits, host, first_pdu, server.on_rejected  # type: ignore[arg-type]
            )
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()  # the slot is held as long as the association runs
        finally:
            server.admission.release(host)
            _close(sock, None)

    def _handshake(self, sock: socket.socket, entry: Pending) -> tuple[socket.socket, bytearray]:
        """TLS handshake (if on) and the whole A-ASSOCIATE-RQ, all within handshake_timeout."""
        limits = self.server.limits
        deadline = time.monotonic() + limits.handshake_timeout
        context = self.server.ssl_context
        if context is not None:
            # A total for the whole handshake, however slowly the ClientHello drips (Python >= 3.5).
            sock.settimeout(limits.handshake_timeout)
            try:
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                entry.sock = sock
                sock.do_handshake()
            except (TimeoutError, socket.timeout) as error:  # noqa: UP041
                self.server.on_tls_failure(tls_failure_label(error))
                raise Refused("handshake timeout") from None
            except (ssl.SSLError, OSError) as error:
                self.server.on_tls_failure(tls_failure_label(error))
                raise Refused(f"TLS handshake failed: {error.__class__.__name__}") from None
        pdu = read_pdu(sock, deadline, associate_rq_cap, "handshake timeout")
        try:
            if len(pdu) < 6 + RQ_FIXED_LENGTH:
                raise ValueError("shorter than its fixed fields")
            A_ASSOCIATE_RQ().decode(bytes(pdu))  # what the DUL will decode: refuse here what it would not
        except Exception:
            raise Refused("garbage: undecodable A-ASSOCIATE-RQ", abort=INVALID_PARAMETER) from None
        return sock, pdu


def _close(sock: socket.socket, last_words: bytes | None) -> None:
    try:
        if last_words is not None:
            sock.settimeout(1.0)
            sock.sendall(last_words)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept thread."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog; socketserver's 5 drops connections of a burst
    block_on_close = False  # shutdown does not wait for running associations

    def __init__(self, *args: Any, limits: Limits, on_rejected: OnRejected = _ignore,
                 on_tls_failure: OnTLSFailure = _ignore, **kwargs: Any) -> None:
        self.limits = limits
        self.on_rejected = on_rejected
        self.on_tls_failure = on_tls_failure
        self.admission = Admission(limits)
        self.pending = PendingConnections()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()  # TLS, if on, is done by the handler thread
        return client, address


def serve(ae: AE, settings: DicomSettings, evt_handlers: list[EventHandlerType],
          ssl_context: ssl.SSLContext | None, *, on_rejected: OnRejected = _ignore,
          on_tls_failure: OnTLSFailure = _ignore) -> GuardedServer:
    """Start the guarded server in a daemon thread (as ``AE.start_server(block=False)`` does).

    ``on_rejected`` and ``on_tls_failure`` count each refusal where it is logged (the node passes
    its :class:`~cxrtriage.observability.Metrics`). Binding errors are left to the caller.
    """
    server: GuardedServer = ae.make_server(  # type: ignore[assignment]
        (settings.host, settings.port), ssl_context=ssl_context, evt_handlers=evt_handlers,
        server_class=GuardedServer, request_handler=GuardedRequestHandler, limits=Limits.from_settings(settings),
        on_rejected=on_rejected, on_tls_failure=on_tls_failure,
    )
    thread = threading.Thread(target=make_target(server.serve_forever),
                              name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}", daemon=True)
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown removes it from there
    return server
