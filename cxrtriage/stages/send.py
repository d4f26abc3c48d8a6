"""The send stage: one stored SEG or SR to one destination, byte for byte as archived.

The file goes out in its own transfer syntax and is never decoded
(:func:`~cxrtriage.scp.sender.send_files`). Success, or a storage warning
(:data:`~cxrtriage.scp.sender.STORED_STATUSES`), marks the job done; an
unreachable destination or any other status fails it, to be retried after
a backoff, so a destination that is down delays only its own jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from ..config import Peer
from ..observability import Metrics, event, hex_status
from ..scp.sender import STORED_STATUSES, ContextNotAccepted, SendError, send_files
from ..storage.archive import Archive
from ..storage.db import Database
from ..storage.models import Instance
from ..storage.queue import Claimed, JobQueue
from .lease_loop import GiveUp, LeaseLost

log = logging.getLogger(__name__)

#: ``send_files``' signature: (peer, files, calling AE, timeout=...) -> statuses.
Sender = Callable[..., list[int | None]]


class RefusedError(RuntimeError):
    """The destination answered with a status that does not mean stored."""


class SendStage:
    """Runs a ``send`` job: ``stage(job, worker)``."""

    def __init__(
        self, db: Database, archive: Archive, queue: JobQueue, metrics: Metrics, destinations: Mapping[str, Peer], *,
        ae_title: str, timeout: float, sender: Sender = send_files,
    ) -> None:
        self.db = db
        self.archive = archive
        self.queue = queue
        self.metrics = metrics
        self.destinations = dict(destinations)
        self.ae_title = ae_title
        self.timeout = timeout
        self.sender = sender

    def __call__(self, job: Claimed, worker: str) -> None:
        peer = self.destinations.get(job.destination)
        if peer is None:
            raise GiveUp(f"destination {job.destination!r} is no longer configured")
        with self.db.session() as session:
            instance = session.get(Instance, job.instance_id)
        assert instance is not None, f"send job {job.id} names no stored instance"
        t0 = time.perf_counter()
        try:
            (status,) = self.sender(peer, [self.archive.path(instance.path)], self.ae_title, timeout=self.timeout)
        except ContextNotAccepted:
            self.metrics.sent.labels(destination=peer.ae_title, outcome="context_not_accepted").inc()
            raise
        except SendError:
            self.metrics.sent.labels(destination=peer.ae_title, outcome="unreachable").inc()
            raise
        if status not in STORED_STATUSES:
            label = hex_status(status) if status is not None else "no_response"
            self.metrics.sent.labels(destination=peer.ae_title, outcome=label).inc()
            raise RefusedError(f"{peer.ae_title} answered C-STORE status {label}")
        with self.db.session() as session:
            if not self.queue.complete(session, job, worker):
                raise LeaseLost()
        self.metrics.sent.labels(destination=peer.ae_title, outcome="sent").inc()
        self.metrics.latency.labels(stage="send").observe(time.perf_counter() - t0)
        event(log, logging.INFO, "sent", sop_instance_uid=instance.sop_instance_uid, destination=peer.ae_title)
