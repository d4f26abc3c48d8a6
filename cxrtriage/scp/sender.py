"""C-STORE SCU: send stored instances to a destination (PACS)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pydicom
from pynetdicom import AE

from ..config import Peer, TLSSettings


def client_tls(tls: TLSSettings, host: str) -> tuple[ssl.SSLContext, str] | None:
    """TLS arguments for an outgoing association, or None for plain TCP."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificates)
    if tls.certificate:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context, host


class SendError(RuntimeError):
    """The destination could not be reached or refused an instance."""


def send_files(peer: Peer, files: list[Path], calling_ae: str, *, timeout: float = 30.0, max_pdu: int = 0) -> list[int]:
    """Send ``files`` over one association; returns each C-STORE status.

    Raises :class:`SendError` when the association cannot be established.
    Presentation contexts are proposed for each file's SOP class in its own
    transfer syntax, with Explicit VR Little Endian as a fallback.
    """
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = max_pdu
    proposed: dict[str, set[str]] = {}
    for ds in datasets:
        syntaxes = proposed.setdefault(str(ds.SOPClassUID), set())
        syntaxes.update({str(ds.file_meta.TransferSyntaxUID), "1.2.840.10008.1.2.1"})
    for sop_class, syntaxes in proposed.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=client_tls(peer.tls, peer.host))
    if not assoc.is_established:
        raise SendError(f"association with {peer.ae_title}@{peer.host}:{peer.port} failed (rejected, aborted or unreachable)")
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status and "Status" in status else -1)
    finally:
        assoc.release()
    return statuses
