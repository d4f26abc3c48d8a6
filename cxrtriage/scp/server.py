"""The node's Application Entity: contexts, access rules, TLS and event handlers."""

from __future__ import annotations

import errno
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import UnifiedProcedureStepPull  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ..config import DicomSettings
from ..errors import ListenerError, StartupError
from ..observability import Metrics, event
from .contexts import FIND_CLASSES, GET_CLASSES, MOVE_CLASSES, STORAGE_CLASSES, TRANSFER_SYNTAXES, VERIFICATION, Status
from .guard import OnRejected, oversized_dataset, serve

log = logging.getLogger(__name__)


def server_tls(settings: DicomSettings) -> ssl.SSLContext | None:
    """DICOM TLS server context; client certificates are required when a CA bundle is set.

    A missing or unusable file is a :class:`StartupError` naming its config key and path.
    """
    tls = settings.tls
    if not tls.enabled:
        return None
    if not tls.certificate or not tls.private_key:
        raise StartupError("dicom.tls.enabled needs dicom.tls.certificate and dicom.tls.private_key")
    files = {"dicom.tls.certificate": tls.certificate, "dicom.tls.private_key": tls.private_key}
    if tls.ca_certificates:
        files["dicom.tls.ca_certificates"] = tls.ca_certificates
    for key, path in files.items():
        _readable(key, path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except ssl.SSLError as error:
        raise StartupError(f"dicom.tls.certificate {tls.certificate} / dicom.tls.private_key {tls.private_key}: "
                           f"not a PEM certificate and its key ({error.reason or error})") from None
    if tls.ca_certificates:
        try:
            context.load_verify_locations(tls.ca_certificates)
        except ssl.SSLError as error:
            raise StartupError(f"dicom.tls.ca_certificates {tls.ca_certificates}: not a PEM CA bundle "
                               f"({error.reason or error})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _readable(key: str, path: str) -> None:
    """Raise a StartupError naming ``key`` unless ``path`` is a file this process can read."""
    if not os.path.isfile(path):
        raise StartupError(f"{key}: no such file: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise StartupError(f"{key}: cannot read {path}: {error.strerror or error}") from None


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


def start_server(settings: DicomSettings, handlers: dict[str, Callable[[Any], Any]], *,
                 metrics: Metrics | None = None) -> ThreadedAssociationServer:
    """Start listening (non-blocking) behind the receive-path guard (see guard.py); returns the server.

    With ``metrics``, every refused or dropped association and every failed TLS handshake is
    counted where it is logged. A port that cannot be bound raises :class:`ListenerError`.
    """
    ae = build_ae(settings)
    on_rejected: OnRejected = metrics.association_rejected if metrics else _not_counted
    bound: list[EventHandlerType] = [
        (evt.EVT_C_ECHO, lambda e: Status.SUCCESS),
        (evt.EVT_C_STORE, refuse_oversized(handlers["store"], settings.max_dataset_mb)),
        (evt.EVT_C_FIND, handlers["find"]),
        (evt.EVT_C_MOVE, handlers["move"]),
        (evt.EVT_C_GET, handlers["get"]),
        (evt.EVT_REJECTED, _log_rejected, [on_rejected]),
        (evt.EVT_ACCEPTED, _log_accepted),
    ]
    context = server_tls(settings)
    try:
        server = serve(ae, settings, bound, context, on_rejected=on_rejected,
                       on_tls_failure=metrics.tls_failure if metrics else _not_counted)
    except OSError as error:
        raise ListenerError("dicom", settings.host, settings.port, bind_failure(error)) from None
    event(log, logging.INFO, "listening", ae_title=settings.ae_title, host=settings.host, port=settings.port,
          tls=settings.tls.enabled)
    return server


def bind_failure(error: OSError) -> str:
    """Why a listener could not bind, in an operator's words."""
    reasons = {errno.EADDRINUSE: "address already in use (another process listens on this port)",
               errno.EACCES: "permission denied (ports below 1024 need privileges)",
               errno.EADDRNOTAVAIL: "address not available on this machine"}
    return reasons.get(error.errno or 0, error.strerror or str(error))


def _not_counted(label: str) -> None:
    """No metrics: refusals are logged only."""


def refuse_oversized(store: Callable[[Any], Any], max_dataset_mb: int) -> Callable[[Any], Any]:
    """C-STORE handler answering 0xA700 for a dataset the guard cut at ``max_dataset_mb``.

    The guard keeps one byte more than the cap of a larger dataset and drops
    the rest as it arrives, so nothing larger is ever buffered.
    """
    limit = max_dataset_mb * 1024 * 1024

    def handle(e: Any) -> Any:
        if oversized_dataset(e.request.DataSet, limit):
            event(log, logging.WARNING, "C-STORE refused", reason="dataset larger than max_dataset_mb",
                  status="0xA700", limit_mb=max_dataset_mb, address=e.assoc.requestor.address)
            return Status.OUT_OF_RESOURCES
        return store(e)

    return handle


def _peer(e: Any) -> dict[str, object]:
    requestor = e.assoc.requestor
    return {"calling_aet": str(requestor.ae_title).strip(), "address": requestor.address}


#: A-ASSOCIATE-RJ (result source, diagnostic) -> why, PS3.8 Table 9-21; the metric label is the reason in snake case.
REJECT_REASONS: dict[tuple[int, int], str] = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context not supported",
    (0x01, 0x03): "calling AE title not allowed",
    (0x01, 0x07): "called AE title wrong",
    (0x02, 0x01): "no reason given (ACSE)",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "too many associations",
}


def _log_rejected(e: Any, on_rejected: OnRejected) -> None:
    primitive = e.assoc.acceptor.primitive
    key = (getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None))
    reason = REJECT_REASONS.get(key, "unknown")  # type: ignore[arg-type]
    if key == (0x02, 0x01) and e.assoc.requestor.user_identity:
        reason = "user identity not verified"
    event(log, logging.WARNING, "association rejected", reason=reason, **_peer(e))
    on_rejected(REJECT_LABELS.get(reason, "other"))


#: The metric labels of the rejections pynetdicom makes (REJECT_REASONS), in the guard's vocabulary.
REJECT_LABELS: dict[str, str] = {
    "calling AE title not allowed": "calling_ae_not_allowed",
    "called AE title wrong": "called_ae_wrong",
    "too many associations": "max_associations",
    "temporary congestion": "congestion",
    "application context not supported": "application_context",
    "protocol version not supported": "protocol_version",
    "user identity not verified": "user_identity",
}


def _log_accepted(e: Any) -> None:
    event(log, logging.DEBUG, "association accepted", **_peer(e))
