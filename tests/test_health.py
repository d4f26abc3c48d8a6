"""Readiness and liveness: /api/health answers 503 with reasons when the node cannot take studies.

Real databases (SQLite and, when configured, PostgreSQL; an unreachable one is
a PostgreSQL URL on a closed port), a real archive filesystem, the real circuits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.stages.circuit import Circuits
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Instance, Job, JobKind, JobState
from cxrtriage.storage.queue import JobQueue
from cxrtriage.triage.health import MIB, Readiness, readiness
from cxrtriage.triage.web import create_app
from cxrtriage.triage.worklist import Worklist

from .harness import free_port


def app(db: Database, archive: Archive, probe: Callable[[], Readiness]) -> TestClient:
    return TestClient(create_app(Worklist(db), archive, token="secret", readiness=probe), base_url="http://127.0.0.1")


def with_send_jobs(db: Database, archive: Archive, tmp_path: Path) -> None:
    """One received image; its send jobs: pending for PACS, running for VNA, done for OLD (no backlog)."""
    from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

    from cxrtriage.observability import Metrics
    from cxrtriage.scp.ingest import Ingest

    path = write_cr(PhantomGenerator(256, 256)(3), tmp_path / "cr.dcm")
    queue = JobQueue(db)
    Ingest(db, archive, queue, Metrics(), 0, max_attempts=2).store(path.read_bytes(), ComputedRadiographyImageStorage,
                                                                   "MODALITY", None)
    with db.session() as session:
        instance = session.scalars(select(Instance)).one().id
        queue.enqueue(session, JobKind.SEND, instance, "PACS")
        queue.enqueue(session, JobKind.SEND, instance, "VNA")
        queue.enqueue(session, JobKind.SEND, instance, "OLD")
    with db.session() as session:
        for destination, state in (("VNA", JobState.RUNNING), ("OLD", JobState.DONE)):
            session.execute(update(Job).where(Job.destination == destination).values(state=state.value))


def test_ready_with_each_destinations_backlog_and_circuit(database: Database, tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive")
    with_send_jobs(database, archive, tmp_path)
    circuits = Circuits(["PACS", "VNA", "IDLE"], failures=1, open_seconds=60)
    circuits["VNA"].failed()  # open: the node is still ready, the results wait in the outbox
    probe = lambda: readiness(database, archive, 1, circuits=circuits.states, models_ready=lambda: True)  # noqa: E731
    response = app(database, archive, probe).get("/api/health")  # no token: a load balancer's probe
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready" and body["reasons"] == [] and body["database"] and body["models_loaded"]
    assert body["free_mb"] > 0 and body["min_free_mb"] == 0
    assert body["destinations"] == [{"destination": "IDLE", "backlog": 0, "circuit": "closed"},
                                    {"destination": "PACS", "backlog": 1, "circuit": "closed"},
                                    {"destination": "VNA", "backlog": 1, "circuit": "open"}]
    assert "PHANTOM" not in response.text  # open without the token: no patient data


def test_not_ready_when_the_database_is_unreachable(tmp_path: Path) -> None:
    gone = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")  # nothing listens there
    archive = Archive(tmp_path / "archive")
    try:
        response = app(gone, archive, lambda: readiness(gone, archive, 0)).get("/api/health")
    finally:
        gone.dispose()
    assert response.status_code == 503
    assert response.json()["status"] == "not_ready" and response.json()["reasons"] == ["database unreachable"]
    assert response.json()["database"] is False


def test_not_ready_below_the_disk_floor(database: Database, tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive")
    floor = archive.free_bytes() + 1024 * MIB  # more than the disk has free
    response = app(database, archive, lambda: readiness(database, archive, floor)).get("/api/health")
    assert response.status_code == 503
    (reason,) = response.json()["reasons"]
    assert reason.startswith("archive below storage.min_free_mb")
    assert response.json()["min_free_mb"] == floor // MIB


def test_not_ready_while_the_models_load(database: Database, tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive")
    loaded = [False]
    web = app(database, archive, lambda: readiness(database, archive, 0, models_ready=lambda: loaded[0]))
    response = web.get("/api/health")
    assert response.status_code == 503 and response.json()["reasons"] == ["models not loaded"]
    assert web.get("/api/health/live").json() == {"status": "alive"}  # alive all the same
    loaded[0] = True
    assert web.get("/api/health").status_code == 200
