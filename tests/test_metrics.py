"""Metrics an operator can alert on: refused associations and TLS failures counted against a real
listener (scp.server.start_server), gauges that read 0 once the queue is drained, and the DICOM
listener's startup errors (a port that cannot be bound, TLS files that cannot be read)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select

from cxrtriage.config import DicomSettings, TLSSettings
from cxrtriage.errors import ListenerError, StartupError
from cxrtriage.observability import GaugeSampler, Metrics
from cxrtriage.scp.contexts import Status
from cxrtriage.scp.server import start_server
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.models import Instance, JobKind, JobState
from cxrtriage.storage.queue import JobQueue

from .harness import fill_random_studies, free_port, make_pki, wait_for

REJECTED = "cxrtriage_associations_rejected_total"
TLS_FAILURES = "cxrtriage_tls_failures_total"
HANDLERS: dict[str, Callable[[Any], Any]] = {
    name: lambda e: Status.SUCCESS for name in ("store", "find", "move", "get")
}


def count(metrics: Metrics, name: str, reason: str) -> float:
    return metrics.registry.get_sample_value(name, {"reason": reason}) or 0.0


def counted(metrics: Metrics, name: str, reason: str, before: float) -> float:
    """Wait until the counter rose above ``before`` (the server counts in its handler thread)."""
    return wait_for(lambda: count(metrics, name, reason) > before, 10, f"{name}{{reason={reason}}}") and \
        count(metrics, name, reason)


def associate(port: int, called: str = "CXRTRIAGE", calling: str = "MODALITY",
              context: ssl.SSLContext | None = None) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    # generous: on a loaded 2-core CI machine a rejection once took longer than 5 s to reach the requestor,
    # which then aborted and could not tell it had been rejected
    ae.acse_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title=called,
                        tls_args=(context, "127.0.0.1") if context else None)


class Listener:
    """A real DICOM listener started by scp.server.start_server, with its own metrics."""

    def __init__(self, **dicom: Any) -> None:
        self.metrics = Metrics()
        self.settings = DicomSettings(port=free_port(), **dicom)
        self.server: ThreadedAssociationServer = start_server(self.settings, HANDLERS, metrics=self.metrics)

    @property
    def port(self) -> int:
        return self.settings.port

    def idle(self) -> Listener:
        """Wait until earlier associations have ended (they hold the per-host slot until then)."""
        admission = self.server.admission  # type: ignore[attr-defined]
        wait_for(lambda: admission.total == 0, 10, "earlier associations to end", interval=0.02)
        return self

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def plain() -> Iterator[Listener]:
    listener = Listener(require_called_aet=True, allowed_calling_aets=["MODALITY"], max_associations_per_host=1)
    yield listener
    listener.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls(pki: dict[str, Path]) -> Iterator[Listener]:
    listener = Listener(tls=TLSSettings(enabled=True, certificate=str(pki["server.pem"]),
                                        private_key=str(pki["server.key"]), ca_certificates=str(pki["ca.pem"])))
    yield listener
    listener.stop()


def test_wrong_called_ae_is_counted(plain: Listener) -> None:
    plain.idle()
    before = count(plain.metrics, REJECTED, "called_ae_wrong")
    assert associate(plain.port, called="SOMEONEELSE").is_rejected
    assert counted(plain.metrics, REJECTED, "called_ae_wrong", before) == before + 1


def test_calling_ae_not_allowed_is_counted(plain: Listener) -> None:
    plain.idle()
    before = count(plain.metrics, REJECTED, "calling_ae_not_allowed")
    assert associate(plain.port, calling="STRANGER").is_rejected
    assert counted(plain.metrics, REJECTED, "calling_ae_not_allowed", before) == before + 1


def test_garbage_is_counted_as_not_dicom(plain: Listener) -> None:
    before = count(plain.metrics, REJECTED, "not_dicom")
    with socket.create_connection(("127.0.0.1", plain.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert counted(plain.metrics, REJECTED, "not_dicom", before) == before + 1


def test_per_host_limit_is_counted(plain: Listener) -> None:
    plain.idle()
    before = count(plain.metrics, REJECTED, "per_host_limit")
    held = associate(plain.port)
    assert held.is_established
    try:
        assert not associate(plain.port).is_established
        assert counted(plain.metrics, REJECTED, "per_host_limit", before) == before + 1
    finally:
        held.release()


def test_accepted_associations_count_nothing(plain: Listener) -> None:
    def total() -> float:
        return sum(s.value for m in plain.metrics.registry.collect() if m.name == "cxrtriage_associations_rejected"
                   for s in m.samples if s.name == REJECTED)

    plain.idle()
    before = total()
    assoc = associate(plain.port)
    assert assoc.is_established
    assoc.release()
    assert total() == before


def test_a_client_without_a_certificate_is_a_tls_failure(tls: Listener, pki: dict[str, Path]) -> None:
    before = count(tls.metrics, TLS_FAILURES, "no_client_certificate")
    rejected = count(tls.metrics, REJECTED, "tls_handshake")
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    assert not associate(tls.port, context=anonymous).is_established
    assert counted(tls.metrics, TLS_FAILURES, "no_client_certificate", before) == before + 1
    assert counted(tls.metrics, REJECTED, "tls_handshake", rejected) == rejected + 1
    trusted = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    trusted.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    assoc = associate(tls.port, context=trusted)
    assert assoc.is_established
    assoc.release()


def test_plain_dicom_to_a_tls_port_is_a_protocol_failure(tls: Listener) -> None:
    before = count(tls.metrics, TLS_FAILURES, "protocol")
    assert not associate(tls.port).is_established
    assert counted(tls.metrics, TLS_FAILURES, "protocol", before) == before + 1


def test_queue_depth_reads_zero_once_drained(database: Any, tmp_path: Path) -> None:
    fill_random_studies(database, 3, seed=7, now=dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    queue = JobQueue(database)
    with database.session() as session:
        for instance_id in session.scalars(select(Instance.id).limit(3)):
            queue.enqueue(session, JobKind.SCORE, instance_id)
    metrics = Metrics()
    sampler = GaugeSampler(metrics, queue.depth, Archive(tmp_path / "archive").free_bytes, kinds=[k.value for k in JobKind],
                           states=[JobState.PENDING.value, JobState.RUNNING.value])

    def depth(kind: str, state: str) -> float | None:
        return metrics.registry.get_sample_value("cxrtriage_queue_depth", {"kind": kind, "state": state})

    running = queue.claim(JobKind.SCORE, "w", 60)
    assert running is not None
    sampler.sample()
    assert (depth("score", "pending"), depth("score", "running"), depth("send", "pending")) == (2, 1, 0)
    while running is not None:
        with database.session() as session:
            assert queue.complete(session, running, "w")
        running = queue.claim(JobKind.SCORE, "w", 60)
    sampler.sample()
    assert (depth("score", "pending"), depth("score", "running")) == (0, 0)
    assert depth("score", "done") == 3  # a state that has rows is reported too
    free = metrics.registry.get_sample_value("cxrtriage_disk_free_bytes")
    assert free is not None and 0 < free <= os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
    rss = metrics.registry.get_sample_value("cxrtriage_process_resident_memory_bytes")
    assert rss is not None and rss > 10 * 1024 * 1024


def test_a_port_in_use_is_a_listener_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenerError) as caught:
            start_server(DicomSettings(port=port), HANDLERS)
    assert (caught.value.listener, caught.value.port) == ("dicom", port)
    assert str(caught.value) == f"dicom listener cannot bind 127.0.0.1:{port}: " \
        "address already in use (another process listens on this port)"


def test_an_address_not_on_this_machine_is_a_listener_error() -> None:
    with pytest.raises(ListenerError, match="192.0.2.1:.*address not available"):
        start_server(DicomSettings(host="192.0.2.1", port=free_port()), HANDLERS)  # TEST-NET-1, RFC 5737


@pytest.mark.skipif(os.geteuid() == 0, reason="root may bind privileged ports")
def test_a_privileged_port_is_a_listener_error() -> None:
    with pytest.raises(ListenerError, match="permission denied"):
        start_server(DicomSettings(port=104), HANDLERS)


def test_missing_or_unusable_tls_files_name_their_key(pki: dict[str, Path], tmp_path: Path) -> None:
    files = {"certificate": str(pki["server.pem"]), "private_key": str(pki["server.key"]),
             "ca_certificates": str(pki["ca.pem"])}
    for key in files:
        missing = str(tmp_path / f"{key}.pem")
        tls = TLSSettings(enabled=True, **{**files, key: missing})
        with pytest.raises(StartupError, match=f"^dicom.tls.{key}: no such file: {missing}$"):
            start_server(DicomSettings(port=free_port(), tls=tls), HANDLERS)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    tls = TLSSettings(enabled=True, **{**files, "ca_certificates": str(not_pem)})
    with pytest.raises(StartupError, match=f"dicom.tls.ca_certificates {not_pem}: not a PEM CA bundle"):
        start_server(DicomSettings(port=free_port(), tls=tls), HANDLERS)
