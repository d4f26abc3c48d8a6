"""STOW-RS sends: the request as PS3.18 10.5 defines it, and each answer classified like a C-STORE outcome.

The DICOMweb service here is a small HTTP server answering what a real one
answers in the cases Orthanc cannot be made to produce on demand (503, a
Failed SOP Sequence, a hang); tests/test_orthanc.py sends to Orthanc's
DICOMweb plugin. The send stage runs with a real database and archive.
"""

from __future__ import annotations

import email
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from cxrtriage.config import Peer
from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.observability import Metrics
from cxrtriage.scp.sender import SendError, SendTimeout
from cxrtriage.scp.stow import PROCESSING_FAILURE, StowRefused, stow_files
from cxrtriage.stages.circuit import Circuits, CircuitState
from cxrtriage.stages.lease_loop import LeaseLoop, Turn
from cxrtriage.stages.send import SendStage
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Instance, Job, JobKind, JobState
from cxrtriage.storage.queue import JobQueue

from .harness import free_port, wait_for


class Service:
    """An HTTP server that records each request and answers with ``self.answer(uids) -> (status, body)``."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answer: Any = lambda uids: (200, referenced(uids))
        self.delay = 0.0  # seconds before answering
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                service.requests.append((dict(self.headers), body))
                if service.delay:
                    threading.Event().wait(service.delay)
                status, answer = service.answer(part_uids(dict(self.headers), body))
                payload = json.dumps(answer).encode() if answer else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client gave up waiting (the timeout test)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.block_on_close = False  # a delayed answer does not hold up the test's end
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def parts(headers: dict[str, str], body: bytes) -> list[email.message.Message]:
    message = email.message_from_bytes(f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
    return list(message.get_payload())  # type: ignore[arg-type]


def part_uids(headers: dict[str, str], body: bytes) -> list[str]:
    import io

    return [str(pydicom.dcmread(io.BytesIO(p.get_payload(decode=True))).SOPInstanceUID)  # type: ignore[arg-type]
            for p in parts(headers, body)]


def _item(uid: str, **extra: Any) -> dict[str, Any]:
    return {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1"]},
            "00081155": {"vr": "UI", "Value": [uid]}, **extra}


def referenced(uids: list[str]) -> dict[str, Any]:
    return {"00081199": {"vr": "SQ", "Value": [_item(u) for u in uids]}}


def failed(uids: list[str], reason: int = 0xA700) -> dict[str, Any]:
    return {"00081198": {"vr": "SQ", "Value": [_item(u, **{"00081197": {"vr": "US", "Value": [reason]}})
                                                for u in uids]}}


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service()
    yield s
    s.close()


@pytest.fixture(scope="module")
def crs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("stow")
    generator = PhantomGenerator(64, 64)
    return [write_cr(generator(7_000 + i), folder / f"{i}.dcm") for i in range(2)]


def peer(url: str, **extra: Any) -> Peer:
    return Peer(ae_title="WEBPACS", type="dicomweb", url=url, **extra)


def test_the_request_is_multipart_related_with_the_files_bytes_unchanged(service: Service, crs: list[Path]) -> None:
    statuses = stow_files(peer(service.url, username="reader", password="pw"), crs, "CXRTRIAGE", timeout=5)
    assert statuses == [0, 0]
    (headers, body), = service.requests
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert headers["Accept"] == "application/dicom+json"
    assert headers["Authorization"] == "Basic cmVhZGVyOnB3"  # reader:pw
    sent = parts(headers, body)
    assert [p.get_content_type() for p in sent] == ["application/dicom"] * 2
    assert [p.get_payload(decode=True) for p in sent] == [f.read_bytes() for f in crs]


def test_answers_are_classified_like_c_store_outcomes(service: Service, crs: list[Path]) -> None:
    web = peer(service.url)
    service.answer = lambda uids: (409, failed(uids[:1]) | referenced(uids[1:]))
    assert stow_files(web, crs, "CXRTRIAGE", timeout=5) == [0xA700, 0]  # one refused, one stored
    service.answer = lambda uids: (200, {})
    assert stow_files(web, crs[:1], "CXRTRIAGE", timeout=5) == [PROCESSING_FAILURE]  # not listed: not stored
    service.answer = lambda uids: (401, None)
    with pytest.raises(StowRefused, match="HTTP 401"):
        stow_files(web, crs[:1], "CXRTRIAGE", timeout=5)
    service.answer = lambda uids: (503, None)
    with pytest.raises(SendError, match="HTTP 503") as down:
        stow_files(web, crs[:1], "CXRTRIAGE", timeout=5)
    assert not isinstance(down.value, SendTimeout)
    with pytest.raises(SendError, match="STOW-RS to .* failed: ConnectionError"):
        stow_files(peer(f"http://127.0.0.1:{free_port()}/dicom-web"), crs[:1], "CXRTRIAGE", timeout=5)


def test_a_service_that_does_not_answer_times_out(service: Service, crs: list[Path]) -> None:
    service.delay = 2.0
    with pytest.raises(SendTimeout, match="within 0.5 s"):
        stow_files(peer(service.url), crs[:1], "CXRTRIAGE", timeout=0.5, connect_timeout=2)


def test_send_stage_uses_stow_for_dicomweb_destinations_and_feeds_the_circuit(
    database: Database, service: Service, crs: list[Path], tmp_path: Path
) -> None:
    """A Failed SOP Sequence item fails the job the ordinary way (the service is up); a 503 opens the circuit
    and the job waits with its attempt kept; then the object is stored."""
    archive = Archive(tmp_path / "archive")
    queue = JobQueue(database, backoff_base=0.05, backoff_cap=0.05)
    metrics = Metrics()
    circuits = Circuits(["WEBPACS"], 1, 0.3)  # one failure opens it, for 0.3 s
    circuit = circuits["WEBPACS"]
    stage = SendStage(database, archive, queue, metrics, {"WEBPACS": peer(service.url)}, ae_title="CXRTRIAGE",
                      timeout=5, circuits=circuits)
    loop = LeaseLoop(queue.for_destination("WEBPACS", gate=circuit), JobKind.SEND, stage, worker="w",
                     lease_seconds=60, poll_seconds=0.05, stopping=threading.Event())
    relative = archive.relative_path("1.2", "1.2.3", "1.2.3.4")
    archive.write(relative, crs[0].read_bytes())
    header = pydicom.dcmread(crs[0], stop_before_pixels=True)
    with database.session() as session:
        row = Instance(sop_instance_uid=str(header.SOPInstanceUID), sop_class_uid=str(header.SOPClassUID),
                       transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID), study_instance_uid="1.2",
                       series_instance_uid="1.2.3", path=relative, sha256="", size=0, kind="sc")
        session.add(row)
        session.flush()
        queue.enqueue(session, JobKind.SEND, row.id, "WEBPACS", max_attempts=5)

    def job() -> Job:
        with database.session() as session:
            return session.scalars(select(Job)).one()

    def next_turn() -> Turn:
        return wait_for(lambda: (t := loop.turn()) is not Turn.IDLE and t, 10, "a claimable send job")

    service.answer = lambda uids: (409, failed(uids))
    assert next_turn() is Turn.RETRYING
    assert circuit.state is CircuitState.CLOSED and "STOW-RS status 0xA700" in job().last_error
    assert job().attempts == 1

    service.answer = lambda uids: (503, None)
    assert next_turn() is Turn.DONE  # the failure that opens the circuit defers the job
    assert circuit.state is CircuitState.OPEN
    assert job().attempts == 1 and "HTTP 503" in job().last_error and job().state == JobState.PENDING

    service.answer = lambda uids: (200, referenced(uids))
    # Half-open once 0.3 s have passed: the trial succeeds.
    assert next_turn() is Turn.DONE and job().state == JobState.DONE
    assert circuit.state is CircuitState.CLOSED
    assert metrics.registry.get_sample_value(
        "cxrtriage_sent_total", {"destination": "WEBPACS", "outcome": "sent"}) == 1
    assert part_uids(*service.requests[-1]) == [str(header.SOPInstanceUID)]
