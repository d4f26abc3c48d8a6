"""C-STORE SCU: send stored DICOM files to a peer, exactly as stored.

One sender serves the node's send stage and ``cxrtriage demo``. Each file
goes out in its own transfer syntax, read from disk and never decoded:
pynetdicom sends a file path's encoded dataset in chunks when
``STORE_SEND_CHUNKED_DATASET`` is set, which needs an accepted presentation
context in exactly that syntax, so that is what is proposed.

Sends have their own short timeouts (``workers.send_connect_timeout``,
``workers.send_dimse_timeout``): a destination that accepts the
association and then never answers costs one DIMSE timeout, named as
such (:class:`SendTimeout`), not the receive side's network timeout.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.status import GENERAL_STATUS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, Status

from ..config import Peer, TLSSettings

# A file path given to send_c_store is sent as stored (not decoded and re-encoded).
# Process-wide, but the node passes paths only here; C-MOVE / C-GET send datasets.
_config.STORE_SEND_CHUNKED_DATASET = True

#: C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the Storage Service's own
#: warnings (coercion of data elements, element discarded, data set does not match SOP class).
STORED_STATUSES: frozenset[int] = frozenset(
    {Status.SUCCESS}
    | {code for code, (category, _) in STORAGE_SERVICE_CLASS_STATUS.items()
       if category == STATUS_WARNING and code not in GENERAL_STATUS}
)


def client_tls(tls: TLSSettings, host: str) -> tuple[ssl.SSLContext, str] | None:
    """TLS arguments for an outgoing association, or None for plain TCP."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificates)
    if tls.certificate:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context, host


def move_target(peers: Sequence[Peer]) -> Callable[[str], tuple[str, int, dict] | None]:
    """C-MOVE's destination lookup: an AE title to (host, port, association arguments), None when unknown."""
    by_title = {peer.ae_title: peer for peer in peers}

    def target(ae_title: str) -> tuple[str, int, dict] | None:
        peer = by_title.get(ae_title)
        if peer is None:
            return None
        tls = client_tls(peer.tls, peer.host)
        return peer.host, peer.port, {"tls_args": tls} if tls else {}

    return target


class SendError(RuntimeError):
    """The destination could not be reached, or accepted no context for a file."""


class ContextNotAccepted(SendError):
    """The association was established but the peer refused a file's SOP class in its transfer syntax."""


class SendTimeout(SendError):
    """The peer did not answer a C-STORE request within the DIMSE timeout (PS3.7 9.1.1); the association is aborted."""


class NoResponse(SendError):
    """The peer aborted or closed the association instead of answering a C-STORE request."""


def _decoded(path: Path) -> pydicom.Dataset:
    """A compressed file decoded, for a peer that takes only Explicit VR Little Endian."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array if ds.get("BitsAllocated") == 1 else None
    ds.decompress(generate_instance_uid=False)  # lossless: the same instance, not a new one
    if frames is not None:  # pydicom leaves 1-bit (BINARY SEG) frames one byte per pixel: pack them again
        ds.PixelData = pack_bits(frames)
    return ds


def send_files(
    peer: Peer, files: Sequence[Path], calling_ae: str, *, timeout: float = 30.0,
    connect_timeout: float | None = None, max_pdu: int = 0,
) -> list[int | None]:
    """Send ``files`` over one association; returns each C-STORE status (None: a response without a status).

    ``connect_timeout`` (default ``timeout``) bounds the TCP connection and
    the association negotiation (PS3.8 9.1.2 ARTIM), ``timeout`` each C-STORE
    response and any stalled write. Raises :class:`SendError` when the
    association cannot be established, :class:`SendTimeout` when the peer does
    not answer a C-STORE in time, :class:`NoResponse` when it drops the
    association instead of answering, :class:`ContextNotAccepted` when the
    peer takes a file's SOP class neither in its transfer syntax nor in
    Explicit VR Little Endian. Only the File Meta Information is read; the
    dataset bytes go out as they are on disk, unless the peer takes a
    compressed file only uncompressed (then it is decoded).
    """
    metas = [read_file_meta_info(f) for f in files]
    wanted = [(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas]
    connect = timeout if connect_timeout is None else connect_timeout
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = connect
    # An idle connection outlives a slow answer by a little, so the DIMSE timeout is what fires (and is named).
    ae.dimse_timeout, ae.network_timeout = timeout, timeout + connect
    ae.maximum_pdu_size = max_pdu
    for sop_class, syntax in dict.fromkeys(wanted):  # one context per pair: the peer accepts each on its own
        ae.add_requested_context(sop_class, [syntax])
    for sop_class in dict.fromkeys(c for c, syntax in wanted if syntax != ExplicitVRLittleEndian):
        # A PACS that cannot take a compressed SEG still gets it, decoded (the pre-0.2 behaviour).
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=client_tls(peer.tls, peer.host))
    if not assoc.is_established:
        raise SendError(
            f"association with {peer.ae_title}@{peer.host}:{peer.port} failed (rejected, aborted or unreachable)"
        )
    _bound_writes(assoc, timeout)
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    statuses: list[int | None] = []
    try:
        for path, pair in zip(files, wanted):
            t0 = time.monotonic()
            if pair in accepted:
                status = assoc.send_c_store(Path(path))
            elif (pair[0], ExplicitVRLittleEndian) in accepted:
                status = assoc.send_c_store(_decoded(path))
            else:
                raise ContextNotAccepted(f"{peer.ae_title} accepted no context for SOP class {pair[0]} in {pair[1]}")
            if not status:  # pynetdicom returns an empty dataset when no response came: it aborted the association
                if time.monotonic() - t0 >= 0.95 * timeout:
                    raise SendTimeout(f"destination {peer.ae_title} did not answer C-STORE within {timeout:g} s")
                raise NoResponse(f"destination {peer.ae_title} closed the association without answering C-STORE")
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _bound_writes(assoc: object, timeout: float) -> None:
    """A peer that stops reading must not block a send forever: writes time out too.

    pynetdicom clears the socket timeout once connected; a timed-out write
    closes the transport (its Evt17), so the C-STORE ends without a response.
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        sock.settimeout(timeout)
