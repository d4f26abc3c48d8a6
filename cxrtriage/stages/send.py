"""The send stage: one stored SEG, SR or SC to one destination, byte for byte as archived.

The file goes out in its own transfer syntax and is never decoded: by
C-STORE to a ``dimse`` destination (:func:`~cxrtriage.scp.sender.send_files`),
by STOW-RS to a ``dicomweb`` one (:func:`~cxrtriage.scp.stow.stow_files`).
Success, or a storage warning (:data:`~cxrtriage.scp.sender.STORED_STATUSES`),
marks the job done.

One destination never holds up another: each has its own send workers
(claiming only its jobs, :meth:`~cxrtriage.storage.queue.JobQueue.for_destination`),
short association and DIMSE timeouts of its own, and a circuit breaker
(:mod:`.circuit`). A failure (unreachable, timed out, refused, dropped)
while the circuit stays closed fails the job the usual way: retried after a
backoff, failed for good after ``max_attempts``. A failure that leaves the
circuit open (the one that trips it, or a failed half-open trial) defers
the job without spending its attempt: while a destination is down its jobs
wait, unclaimed, however long that lasts, and flow again once a trial
succeeds. A destination that answers but takes no context for an object
(:class:`~cxrtriage.scp.sender.ContextNotAccepted`), or a DICOMweb service
that refuses it (HTTP 4xx, :class:`~cxrtriage.scp.stow.StowRefused`, or a
Failed SOP Sequence item), is up: that counts as a success for its
circuit, and the job fails the usual way. HTTP 5xx, a refused connection or
a timeout count as down, like an unreachable DIMSE peer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from ..config import Peer
from ..observability import Metrics, event, hex_status, safe_error
from ..scp.sender import STORED_STATUSES, ContextNotAccepted, SendError, SendTimeout, send_files
from ..scp.stow import StowRefused, stow_files
from ..storage.archive import Archive
from ..storage.db import Database
from ..storage.models import Instance
from ..storage.queue import Claimed, JobQueue
from .circuit import CircuitBreaker, Circuits
from .lease_loop import GiveUp, LeaseLost

log = logging.getLogger(__name__)

#: ``send_files``' signature: (peer, files, calling AE, timeout=..., connect_timeout=...) -> statuses.
Sender = Callable[..., list[int | None]]


class RefusedError(RuntimeError):
    """The destination answered with a status that does not mean stored."""


class SendStage:
    """Runs a ``send`` job: ``stage(job, worker)``."""

    def __init__(
        self, db: Database, archive: Archive, queue: JobQueue, metrics: Metrics, destinations: Mapping[str, Peer], *,
        ae_title: str, timeout: float = 30.0, connect_timeout: float = 10.0, circuits: Circuits | None = None,
        sender: Sender = send_files, web_sender: Sender = stow_files,
    ) -> None:
        self.db = db
        self.archive = archive
        self.queue = queue
        self.metrics = metrics
        self.destinations = dict(destinations)
        self.ae_title = ae_title
        self.timeout = timeout  # DIMSE: how long a destination may take to answer a C-STORE
        self.connect_timeout = connect_timeout
        self.circuits = circuits
        self.sender = sender  # dimse destinations
        self.web_sender = web_sender  # dicomweb destinations

    def __call__(self, job: Claimed, worker: str) -> None:
        peer = self.destinations.get(job.destination)
        if peer is None:
            raise GiveUp(f"destination {job.destination!r} is no longer configured")
        circuit = self.circuits.get(job.destination) if self.circuits is not None else None
        try:
            self._send(job, worker, peer, circuit)
        finally:
            if circuit is not None:  # a trial that ended without a verdict goes to the next claim
                circuit.release(worker)

    def _send(self, job: Claimed, worker: str, peer: Peer, circuit: CircuitBreaker | None) -> None:
        with self.db.session() as session:
            instance = session.get(Instance, job.instance_id)
        assert instance is not None, f"send job {job.id} names no stored instance"
        t0 = time.perf_counter()
        web = peer.type == "dicomweb"
        sender = self.web_sender if web else self.sender
        try:
            (status,) = sender(peer, [self.archive.path(instance.path)], self.ae_title, timeout=self.timeout,
                               connect_timeout=self.connect_timeout)
            if status not in STORED_STATUSES:
                label = hex_status(status) if status is not None else "no_status"
                self.metrics.sent.labels(destination=peer.ae_title, outcome=label).inc()
                raise RefusedError(f"{peer.ae_title} answered {'STOW-RS' if web else 'C-STORE'} status {label}")
        except StowRefused:
            self.metrics.sent.labels(destination=peer.ae_title, outcome="http_refused").inc()
            if circuit is not None:
                circuit.succeeded()  # it answered: up, it refuses this request
            raise
        except ContextNotAccepted:
            self.metrics.sent.labels(destination=peer.ae_title, outcome="context_not_accepted").inc()
            if circuit is not None:
                circuit.succeeded()  # it answered: up, it just does not take this object
            raise
        except RefusedError:
            # It answered: up. Only this object is refused, so the job fails the ordinary way (backoff, attempts
            # spent) and cannot hold the circuit open as a trial that always fails.
            if circuit is not None:
                circuit.succeeded()
            raise
        except SendError as exc:
            outcome = "timeout" if isinstance(exc, SendTimeout) else "unreachable"
            self.metrics.sent.labels(destination=peer.ae_title, outcome=outcome).inc()
            if circuit is None or not circuit.failed():
                raise  # the destination still counts as up: an ordinary failure, retried with backoff
            self._defer(job, worker, peer, circuit, exc)
            return
        if circuit is not None:
            circuit.succeeded()
        with self.db.session() as session:
            if not self.queue.complete(session, job, worker):
                raise LeaseLost()
        self.metrics.sent.labels(destination=peer.ae_title, outcome="sent").inc()
        self.metrics.latency.labels(stage="send").observe(time.perf_counter() - t0)
        event(log, logging.INFO, "sent", sop_instance_uid=instance.sop_instance_uid, destination=peer.ae_title)

    def _defer(self, job: Claimed, worker: str, peer: Peer, circuit: CircuitBreaker, exc: Exception) -> None:
        """The destination's circuit is open: the job waits for the next trial, its attempt not spent."""
        error = safe_error(exc)
        retry_in = circuit.retry_in()
        if not self.queue.defer(job, worker, f"{error} (circuit open: retried in {retry_in:.0f} s)", retry_in):
            raise LeaseLost()
        event(log, logging.WARNING, "destination circuit open; send deferred", job=job.id,
              destination=peer.ae_title, consecutive_failures=circuit.consecutive_failures,
              retry_in_seconds=round(retry_in, 1), error=error)
