"""C-ECHO SCU: is a peer there, does it accept us, and how fast does it answer (PS3.4 Annex A, Verification)?"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ..config import Peer
from .sender import client_tls


class EchoFailed(RuntimeError):
    """The peer could not be reached, rejected or aborted the association, or did not answer; one-line reason."""


@dataclass(frozen=True)
class EchoResult:
    status: int  # the C-ECHO response status (0x0000: success)
    milliseconds: float  # association, C-ECHO and release


def echo(peer: Peer, calling_ae: str, *, timeout: float = 10.0) -> EchoResult:
    """Associate with ``peer`` (over TLS when its ``tls`` is enabled), send one C-ECHO and release."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    t0 = time.monotonic()
    try:
        tls = client_tls(peer.tls, peer.host)
    except (OSError, ssl.SSLError) as exc:
        raise EchoFailed(f"TLS files of {peer.ae_title} cannot be used: {exc}") from None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if assoc.is_rejected:
        raise EchoFailed(f"{where} rejected the association (e.g. unknown calling or called AE title)")
    if not assoc.is_established:
        raise EchoFailed(f"{where} {_why_not(peer, timeout)}")
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if not response or "Status" not in response:
        raise EchoFailed(f"{peer.ae_title}@{peer.host}:{peer.port} did not answer the C-ECHO")
    return EchoResult(int(response.Status), (time.monotonic() - t0) * 1000.0)


def _why_not(peer: Peer, timeout: float) -> str:
    """Why no association came: pynetdicom reports a refused connection as an abort, so ask TCP itself."""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=timeout):
            pass
    except OSError as exc:
        return f"unreachable: {exc.strerror or exc}"
    return "aborted the association (TLS mismatch, or the peer closed it)"
