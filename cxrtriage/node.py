"""The running node: storage SCP, scoring workers, send workers, metrics.

``cxrtriage serve`` builds one :class:`Node`. It only wires things and starts and stops them: receiving is
:mod:`.scp.ingest`, the workers are :mod:`.stages` run by the lease loop, listeners :mod:`.listeners`. All
durable state lives in the database and the archive, so a node killed at any moment restarts where it stopped:
jobs its previous process held are released at start-up, and scoring and sending pick up every job not done.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable
from typing import Any

from .config import Settings
from .config_audit import record_config_change
from .listeners import start_metrics, web_server
from .observability import Metrics, event
from .scp.ingest import Ingest
from .scp.query import QueryEngine, make_handlers
from .scp.sender import move_target
from .scp.server import start_server
from .stages.circuit import Circuits
from .stages.housekeeping import Housekeeping
from .stages.lease_loop import FailureHook, LeaseLoop, Stage
from .stages.score import LocalScorer, Scorer, ScoreStage, warm_up
from .stages.scorers import process_scorer, scoring_threads
from .stages.send import SendStage
from .storage.archive import Archive
from .storage.db import Database
from .storage.models import JobKind
from .storage.queue import JobQueue
from .triage.scheduler import start_scheduler, stop_scheduler
from .triage.worklist import Worklist

log = logging.getLogger(__name__)
MIB = 1024 * 1024


class Node:
    """Database, archive, queue and the services around them, for one ``Settings``."""

    def __init__(self, settings: Settings, pipeline: Any = None) -> None:
        self.settings = settings
        self.worker_prefix = f"{settings.node_name}:"
        self.incarnation = f"{settings.node_name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.db = Database(settings.storage.database_url)
        self.db.migrate()
        self.archive = Archive(settings.storage.archive_dir)
        w, d = settings.workers, settings.dicom
        self.queue = JobQueue(self.db, backoff_base=w.backoff_seconds, backoff_cap=w.backoff_max_seconds)
        self.metrics = Metrics()
        self.ingest = Ingest(self.db, self.archive, self.queue, self.metrics, settings.storage.min_free_mb * MIB,
                             w.max_attempts, max_dataset_bytes=d.max_dataset_mb * MIB,
                             max_inflated_bytes=d.max_inflated_mb * MIB)
        self.worklist = Worklist(self.db, settings.triage.priority)
        self.query = QueryEngine(self.db, self.archive, d.ae_title, self.worklist)
        self.destinations = {p.ae_title: p for p in settings.destinations}
        self.scorer: Scorer = LocalScorer(settings.inference, jpeg2000=w.seg_jpeg2000, pipeline=pipeline,
                                          secondary_capture=settings.results.secondary_capture)
        self.circuits = Circuits(self.destinations, w.breaker_failures, w.breaker_open_seconds,
                                 registry=self.metrics.registry)
        self.send_stage = SendStage(self.db, self.archive, self.queue, self.metrics, self.destinations,
                                    ae_title=d.ae_title, timeout=w.send_dimse_timeout,
                                    connect_timeout=w.send_connect_timeout, circuits=self.circuits)
        self.stopping = threading.Event()
        self.models_ready = threading.Event()  # readiness: set once the scorer has warmed up (or none runs)
        self.threads: list[threading.Thread] = []
        self.server: Any = None
        self.metrics_server: Any = None
        self.web_server: Any = None
        self.scheduler: Any = None

    def start(self) -> None:
        """Start everything; a part that fails (a listener that cannot bind) stops the parts already started."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        released = self.queue.release_worker(self.worker_prefix, keep=self.incarnation)
        if released:
            event(log, logging.WARNING, "re-queued jobs of a previous run", jobs=released)
        record_config_change(self.db, self.settings)
        node, threads = self.settings.node, scoring_threads(self.settings)
        if not threads or self._start_scoring(threads):
            self.models_ready.set()
        if node.runs("receiver"):
            moves = move_target(self.settings.dicom.move_destinations)
            handlers: dict[str, Any] = {"store": self.ingest.handle, **make_handlers(self.query, moves)}
            self.server = start_server(self.settings.dicom, handlers, metrics=self.metrics)
        if node.runs("sender"):
            self._start_sending()
        serving = {"scorer": bool(threads), "web": self.settings.web.enabled}  # roles configured off
        roles = [role for role in node.roles if serving.get(role, True)]
        housekeeping = Housekeeping(self.db, self.queue, self.metrics, self.archive,
                                    name=self.settings.node_name, incarnation=self.incarnation, roles=roles,
                                    models={"preset": self.settings.inference.preset} if threads else {})
        self._spawn("housekeeping", housekeeping.run, self.stopping)
        if self.settings.metrics.enabled:
            self.metrics_server = start_metrics(self.settings.metrics, self.metrics.registry)
        if node.runs("web") and self.settings.web.enabled:
            self._start_web()
        if node.runs("scheduler"):
            self.scheduler = start_scheduler(self.settings, self.db.engine, holder=self.incarnation)
        event(log, logging.INFO, "node started", incarnation=self.incarnation, roles=",".join(roles),
              destinations=sorted(self.destinations), database=self.db.engine.dialect.name)

    def _start_scoring(self, threads: int) -> bool:
        """Scoring threads (each waits on the pool or the engine, if any: :mod:`.stages.scorers`), warmed up
        first; whether the models loaded."""
        w = self.settings.workers
        self.scorer = process_scorer(self.settings) or self.scorer
        ready = warm_up(self.scorer, self.archive.tmp, w.scoring_processes)
        stage = ScoreStage(self.db, self.archive, self.queue, self.metrics, self.scorer,
                           destinations=list(self.destinations), ae_title=self.settings.dicom.ae_title,
                           max_attempts=w.max_attempts,
                           min_free_bytes=self.settings.storage.min_free_mb * MIB)
        for i in range(threads):  # the stage is also the claim gate: nothing is claimed below min_free_mb
            self._spawn_loop(f"score-{i}", JobKind.SCORE, stage, stage.record_failed, queue=self.queue.gated(stage))
        return ready

    def _start_sending(self) -> None:
        """``send_workers`` per destination, each claiming only its destination's jobs while its circuit lets
        it (one that hangs holds up no other); one more gives up jobs of destinations no longer configured."""
        w = self.settings.workers
        if not w.send_workers:
            return
        for n, destination in enumerate(self.destinations):
            queue = self.queue.for_destination(destination, gate=self.circuits[destination])
            for i in range(w.send_workers):
                self._spawn_loop(f"send-{n}-{i}", JobKind.SEND, self.send_stage, queue=queue)
        self._spawn_loop("send-unconfigured", JobKind.SEND, self.send_stage,
                         queue=self.queue.for_other_destinations(self.destinations))

    def _start_web(self) -> None:
        from .triage.health import readiness
        from .triage.web import create_app

        web, floor = self.settings.web, self.settings.storage.min_free_mb * MIB
        app = create_app(self.worklist, self.archive, token=web.token, metrics=self.metrics,
                         allowed_hosts=web.allowed_hosts, destinations=self.circuits.states, readers=web.readers,
                         show_patient_identity=web.show_patient_identity,
                         readiness=lambda: readiness(self.db, self.archive, floor, circuits=self.circuits.states,
                                                     models_ready=self.models_ready.is_set))
        self.web_server, serve = web_server(app, web)
        self._spawn("web", serve)

    def stop(self) -> None:
        self.models_ready.clear()  # a stopping node is not ready: load balancers send it nothing new
        self.stopping.set()
        if self.scheduler is not None:
            stop_scheduler(self.scheduler, self.db, self.incarnation)
        if self.web_server is not None:
            self.web_server.should_exit = True
        if self.server is not None:
            self.server.shutdown()
        for thread in self.threads:
            thread.join(timeout=30)
        self.scorer.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.db.dispose()
        event(log, logging.INFO, "node stopped")

    def _spawn(self, name: str, target: Callable[..., Any], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _spawn_loop(self, name: str, kind: JobKind, stage: Stage, on_failed: FailureHook | None = None, *,
                    queue: JobQueue | None = None) -> None:
        """A worker thread running ``stage`` on jobs of ``kind`` (from ``queue``, default all of them);
        its lease holder is ``<incarnation>:<name>``."""
        w = self.settings.workers
        loop = LeaseLoop(queue or self.queue, kind, stage, worker=f"{self.incarnation}:{name}",
                         lease_seconds=w.lease_seconds, poll_seconds=w.poll_seconds, stopping=self.stopping,
                         on_failed=on_failed)
        self._spawn(name, loop.run)

    def serve_forever(self) -> None:
        done = threading.Event()  # SIGTERM while starting: start, then stop cleanly
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        self.stop()
