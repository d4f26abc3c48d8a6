"""The node's Application Entity: contexts, access rules, TLS and event handlers."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import UnifiedProcedureStepPull  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ..config import DicomSettings
from ..observability import event
from .contexts import FIND_CLASSES, GET_CLASSES, MOVE_CLASSES, STORAGE_CLASSES, TRANSFER_SYNTAXES, VERIFICATION, Status

log = logging.getLogger(__name__)


def server_tls(settings: DicomSettings) -> ssl.SSLContext | None:
    """DICOM TLS server context; client certificates are required when a CA bundle is set."""
    tls = settings.tls
    if not tls.enabled:
        return None
    if not tls.certificate or not tls.private_key:
        raise ValueError("dicom.tls.enabled needs dicom.tls.certificate and dicom.tls.private_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        context.load_verify_locations(tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def build_ae(settings: DicomSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.maximum_pdu_size
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = settings.require_called_aet
    if settings.allowed_calling_aets:
        # pynetdicom rejects others with "calling AE title not recognised" (PS3.8 A-ASSOCIATE-RJ reason 3).
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_CLASSES:
        # SCP role for C-STORE; as C-GET SCU peers ask for our SCU role on these too.
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for sop_class in FIND_CLASSES + MOVE_CLASSES + GET_CLASSES:
        ae.add_supported_context(sop_class)
    ae.add_supported_context(UnifiedProcedureStepPull)  # the reading worklist as UPS workitems
    return ae


def start_server(settings: DicomSettings, handlers: dict[str, Callable[[Any], Any]]) -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns pynetdicom's threaded server."""
    ae = build_ae(settings)
    bound: list[EventHandlerType] = [
        (evt.EVT_C_ECHO, lambda e: Status.SUCCESS),
        (evt.EVT_C_STORE, handlers["store"]),
        (evt.EVT_C_FIND, handlers["find"]),
        (evt.EVT_C_MOVE, handlers["move"]),
        (evt.EVT_C_GET, handlers["get"]),
        (evt.EVT_REJECTED, _log_rejected),
        (evt.EVT_ACCEPTED, _log_accepted),
    ]
    server = ae.start_server(
        (settings.host, settings.port), block=False, evt_handlers=bound, ssl_context=server_tls(settings)
    )
    assert server is not None  # block=False always returns the server
    event(log, logging.INFO, "listening", ae_title=settings.ae_title, host=settings.host, port=settings.port,
          tls=settings.tls.enabled)
    return server


def _peer(e: Any) -> dict[str, object]:
    requestor = e.assoc.requestor
    return {"calling_aet": str(requestor.ae_title).strip(), "address": requestor.address}


def _log_rejected(e: Any) -> None:
    event(log, logging.WARNING, "association rejected", **_peer(e))


def _log_accepted(e: Any) -> None:
    event(log, logging.DEBUG, "association accepted", **_peer(e))
