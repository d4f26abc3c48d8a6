"""The node's housekeeping loop: gauges every few seconds, and its heartbeat in the database.

Gauges (:class:`~cxrtriage.observability.GaugeSampler`): every queue
(kind, state) pair, 0 included, archive free space, process memory. The
heartbeat (:func:`~cxrtriage.storage.cluster.heartbeat`) is the node's row in
``nodes``: name, incarnation, roles, version and models, and when it was last
seen, so an operator (and the other nodes) can tell which nodes are alive.
After each beat the live nodes, this one included, are listed in the gauge
``cxrtriage_node_last_seen_timestamp_seconds`` (one series per node; a node
gone silent drops out).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Mapping, Sequence

from .. import __version__
from ..observability import GaugeSampler, Metrics, event, safe_error
from ..storage.archive import Archive
from ..storage.cluster import HEARTBEAT_SECONDS, LIVE_SECONDS, heartbeat, live_nodes
from ..storage.db import Database
from ..storage.models import JobKind, JobState, as_utc, utcnow
from ..storage.queue import JobQueue

log = logging.getLogger(__name__)


class Housekeeping:
    """``run(stopping)`` samples the gauges every ``interval`` seconds and beats every ``beat_every`` samples."""

    def __init__(self, db: Database, queue: JobQueue, metrics: Metrics, archive: Archive, *, name: str,
                 incarnation: str, roles: Sequence[str], models: Mapping[str, str], interval: float = 2.0,
                 beat_every: int | None = None) -> None:
        self.db = db
        self.metrics = metrics
        self.sampler = GaugeSampler(metrics, queue.depth, archive.free_bytes, kinds=[k.value for k in JobKind],
                                    states=[s.value for s in JobState])
        self.name, self.incarnation, self.roles, self.models = name, incarnation, list(roles), dict(models)
        self.started_at = utcnow()
        self.interval = interval
        self.beat_every = beat_every or max(1, round(HEARTBEAT_SECONDS / interval))

    def beat(self, now: dt.datetime | None = None) -> None:
        with self.db.session() as session:
            heartbeat(session, name=self.name, incarnation=self.incarnation, roles=self.roles, version=__version__,
                      models=self.models, started_at=self.started_at, now=now)
        with self.db.session() as session:
            nodes = live_nodes(session, LIVE_SECONDS, now=now)
            self.metrics.live_nodes.clear()
            for node in nodes:
                self.metrics.live_nodes.labels(node=node.name, roles=node.roles, version=node.version).set(
                    as_utc(node.last_seen).timestamp())

    def run(self, stopping: threading.Event) -> None:
        tick, last_error = 0, ""
        while True:
            try:  # neither gauges nor heartbeat may take the node down
                self.sampler.sample()
                if tick % self.beat_every == 0:
                    self.beat()
                last_error = ""
            except Exception as exc:
                if safe_error(exc) != last_error:  # logged once per new problem, not every 2 s
                    last_error = safe_error(exc)
                    event(log, logging.WARNING, "housekeeping failed", error=last_error)
            tick += 1
            if stopping.wait(self.interval):
                return
