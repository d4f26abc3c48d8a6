"""One destination never holds up another: a PACS that accepts the association and then never answers.

The node's own send wiring (:meth:`Node._start_sending`) runs against two
real destinations: DCMTK ``storescp`` (healthy) and a pynetdicom SCP in
this process that accepts every association and then sits on each C-STORE
(:class:`HangingSCP`). Objects are stored through the node's real C-STORE
core and their send jobs queued, as the score stage queues them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from cxrtriage.config import Settings
from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.node import Node
from cxrtriage.scp.contexts import Status
from cxrtriage.storage.models import Instance, Job, JobKind, JobState

from .harness import StoreSCP, free_port, wait_for

N_OBJECTS = 6


class HangingSCP:
    """Accepts every association, then answers no C-STORE until :meth:`recover` (or 120 s)."""

    def __init__(self, ae_title: str = "HANG") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.recovered = threading.Event()
        self.requests = 0  # C-STOREs that arrived, answered or not
        self.stored: set[str] = set()  # SOP Instance UIDs answered with success
        self._lock = threading.Lock()
        self.server: Any = None

    def start(self) -> HangingSCP:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 64  # stuck associations must not be what refuses the next one
        ae.add_supported_context(ComputedRadiographyImageStorage)

        def hang(event: Any) -> int:
            with self._lock:
                self.requests += 1
            if not self.recovered.wait(120):
                return Status.OUT_OF_RESOURCES
            with self._lock:
                self.stored.add(str(event.request.AffectedSOPInstanceUID))
            return Status.SUCCESS

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, hang)])
        return self

    def recover(self) -> None:
        self.recovered.set()

    def stop(self) -> None:
        self.recovered.set()  # frees the stuck handler threads
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def hanging() -> Iterator[HangingSCP]:
    scp = HangingSCP().start()
    yield scp
    scp.stop()


@pytest.fixture
def healthy(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", "PACS").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    return [write_cr(PhantomGenerator(96, 96)(7_000 + i), folder / f"{i}.dcm", patient_id=f"ISO-{i}")
            for i in range(N_OBJECTS)]


def _node(tmp_path: Path, database_url: str, healthy: StoreSCP, hanging: HangingSCP, **workers: Any) -> Node:
    settings = Settings.model_validate({
        "node_name": "isolation",
        "storage": {"database_url": database_url, "archive_dir": str(tmp_path / "archive"), "min_free_mb": 0},
        "workers": {"send_workers": 2, "backoff_seconds": 0.2, "backoff_max_seconds": 1.0, "poll_seconds": 0.05,
                    "max_attempts": 3, **workers},
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": healthy.port},
                         {"ae_title": "HANG", "host": "127.0.0.1", "port": hanging.port}],
        "metrics": {"enabled": False}, "web": {"enabled": False},
    })
    return Node(settings)


def _queue_sends(node: Node, images: list[Path]) -> list[str]:
    """Store each image as a C-STORE would and queue its send to both destinations; returns the UIDs."""
    uids = []
    for path in images:
        assert node.ingest.store(path.read_bytes(), ComputedRadiographyImageStorage, "MODALITY", None) == 0
        uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    with node.db.session() as session:
        for row in session.scalars(select(Instance)):
            for destination in ("HANG", "PACS"):  # the hanging one first: it would be claimed first
                node.queue.enqueue(session, JobKind.SEND, row.id, destination, max_attempts=3)
    return uids


def _jobs(node: Node, destination: str) -> list[Job]:
    with node.db.session() as session:
        return list(session.scalars(select(Job).where(Job.kind == JobKind.SEND, Job.destination == destination)))


def _received(pacs: StoreSCP) -> set[str]:
    uids = set()
    for path in pacs.received():
        try:
            uids.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):  # storescp still writing it
            pass
    return uids


def test_a_destination_that_never_answers_does_not_hold_up_a_healthy_one(
    tmp_path: Path, database_url: str, healthy: StoreSCP, hanging: HangingSCP, images: list[Path]
) -> None:
    # The hang outlasts the test: its sends wait out a 60 s DIMSE timeout while the healthy PACS is served.
    node = _node(tmp_path, database_url, healthy, hanging, send_dimse_timeout=60)
    uids = _queue_sends(node, images)
    try:
        node._start_sending()
        wait_for(lambda: _received(healthy) == set(uids), 10, "every object at the healthy PACS")
        wait_for(lambda: all(j.state == JobState.DONE for j in _jobs(node, "PACS")), 5, "its jobs done")
        wait_for(lambda: hanging.requests >= 1, 10, "a C-STORE at the hanging destination")
        assert not hanging.stored  # the hanging one is really stuck meanwhile
        assert {j.state for j in _jobs(node, "HANG")} <= {JobState.RUNNING, JobState.PENDING}

        hanging.recover()  # it answers at last: everything queued for it arrives, nothing lost
        wait_for(lambda: hanging.stored == set(uids), 30, "every object at the recovered destination")
        wait_for(lambda: all(j.state == JobState.DONE for j in _jobs(node, "HANG")), 10, "its jobs done")
    finally:
        hanging.recover()  # no send left waiting out its timeout: the node stops at once
        node.stop()


def test_a_hanging_destination_opens_its_circuit_and_its_jobs_wait_unspent_until_it_recovers(
    tmp_path: Path, database_url: str, healthy: StoreSCP, hanging: HangingSCP, images: list[Path]
) -> None:
    node = _node(tmp_path, database_url, healthy, hanging, send_dimse_timeout=0.5, send_connect_timeout=2,
                 breaker_failures=2, breaker_open_seconds=1.0)
    uids = _queue_sends(node, images)
    circuit = node.circuits["HANG"]
    try:
        node._start_sending()
        wait_for(lambda: _received(healthy) == set(uids), 10, "every object at the healthy PACS")
        # Two timeouts open the circuit; each trial after an open second fails and opens it again.
        wait_for(lambda: hanging.requests >= 4, 20, "failed trials of the open circuit")
        hang_jobs = _jobs(node, "HANG")
        assert not [j for j in hang_jobs if j.state == JobState.FAILED]  # never failed for good while it hangs
        assert max(j.attempts for j in hang_jobs) <= 1  # an open circuit spends no attempts
        errors = {j.last_error for j in hang_jobs if j.last_error}
        assert any(e.startswith("SendTimeout: destination HANG did not answer C-STORE within 0.5 s") for e in errors)
        assert any("circuit open" in e for e in errors)
        assert circuit.consecutive_failures >= 2
        assert {s["destination"]: s["state"] for s in node.circuits.states()}["PACS"] == "closed"

        hanging.recover()  # the next trial succeeds, the circuit closes, the backlog flows
        wait_for(lambda: all(j.state == JobState.DONE for j in _jobs(node, "HANG")), 30, "every HANG job done")
        assert hanging.stored == set(uids)
        assert circuit.consecutive_failures == 0 and str(circuit.state) == "closed"
    finally:
        hanging.recover()  # no send left waiting out its timeout: the node stops at once
        node.stop()
