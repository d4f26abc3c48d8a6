"""The running node: storage SCP, scoring workers, send workers, metrics.

``cxrtriage serve`` builds one :class:`Node`. All durable state lives in the
database and the archive, so a node killed at any moment restarts where it
stopped: jobs its previous process held are released at start-up, and
scoring and sending pick up every job not marked done.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import pydicom
from sqlalchemy import select

from .config import Peer, Settings
from .observability import Metrics, event
from .scp.ingest import Ingest
from .scp.query import QueryEngine, make_handlers
from .scp.sender import SendError, send_files
from .scp.server import start_server
from .storage.archive import Archive
from .storage.catalog import instance_row
from .storage.db import Database
from .storage.models import Instance, ScoreResult
from .storage.queue import Claimed, JobQueue
from .triage.worklist import Worklist

log = logging.getLogger("cxrtriage.node")

#: C-STORE statuses a destination may answer that mean "stored".
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class LeaseLost(RuntimeError):
    """Another worker took the job over; this worker's results are rolled back."""


class Node:
    def __init__(self, settings: Settings, pipeline: Any = None) -> None:
        self.settings = settings
        self.worker_prefix = f"{settings.node_name}:"
        self.incarnation = f"{settings.node_name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.db = Database(settings.storage.database_url)
        self.db.migrate()
        self.archive = Archive(settings.storage.archive_dir)
        w = settings.workers
        self.queue = JobQueue(self.db, backoff_base=w.backoff_seconds, backoff_cap=w.backoff_max_seconds)
        self.metrics = Metrics()
        self.ingest = Ingest(self.db, self.archive, self.queue, self.metrics,
                             settings.storage.min_free_mb * 1024 * 1024, w.max_attempts)
        self.worklist = Worklist(self.db, settings.triage.priority)
        self.query = QueryEngine(self.db, self.archive, settings.dicom.ae_title, self.worklist)
        self.destinations = {d.ae_title: d for d in settings.destinations}
        self.move_destinations = {d.ae_title: d for d in settings.dicom.move_destinations}
        self._pipeline = pipeline
        self._pipeline_lock = threading.Lock()
        self.pool: Any = None  # ScoringPool when workers.scoring_processes > 0
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.server: Any = None
        self.metrics_server: Any = None
        self.web_server: Any = None
        self.scheduler: Any = None

    # -- lifecycle -------------------------------------------------------

    @property
    def pipeline(self) -> Any:
        with self._pipeline_lock:
            if self._pipeline is None:
                from .inference.pipeline import Pipeline

                self._pipeline = Pipeline(self.settings.inference)
            return self._pipeline

    def start(self) -> None:
        released = self.queue.release_worker(self.worker_prefix, keep=self.incarnation)
        if released:
            event(log, logging.WARNING, "re-queued jobs of a previous run", jobs=released)
        w = self.settings.workers
        scoring_threads = max(w.scoring_workers, w.scoring_processes)
        if scoring_threads:
            self._warm_up_scoring()
        handlers: dict[str, Any] = {"store": self.ingest.handle, **make_handlers(self.query, self._move_target)}
        self.server = start_server(self.settings.dicom, handlers)
        for i in range(scoring_threads):
            self._spawn(f"score-{i}", self._work_loop, "score", self._score)
        for i in range(w.send_workers):
            self._spawn(f"send-{i}", self._work_loop, "send", self._send)
        self._spawn("gauges", self._gauge_loop)
        if self.settings.metrics.enabled:
            from prometheus_client import start_http_server

            m = self.settings.metrics
            self.metrics_server, _ = start_http_server(m.port, addr=m.host, registry=self.metrics.registry)
            event(log, logging.INFO, "metrics", url=f"http://{m.host}:{self.metrics_server.server_port}/metrics")
        if self.settings.web.enabled:
            self._start_web()
        from .triage.scheduler import start_scheduler

        self.scheduler = start_scheduler(self.settings, self.db.engine)
        event(log, logging.INFO, "node started", incarnation=self.incarnation,
              destinations=sorted(self.destinations), database=self.db.engine.dialect.name)

    def _warm_up_scoring(self) -> None:
        """Load the models and score one small phantom before accepting work.

        The first SEG + SR a process builds costs about a second more than
        the next (imports, highdicom's first use); the first real image
        should not wait for that.
        """
        from .inference.instance import score_instance
        from .inference.phantom import PhantomGenerator, write_cr

        t0 = time.perf_counter()
        w = self.settings.workers
        if w.scoring_processes:
            from .inference.parallel import ScoringPool

            self.pool = ScoringPool(self.settings.inference, w.scoring_processes)
        sample = write_cr(PhantomGenerator(320, 288)(0), self.archive.tmp / f"warm-up-{os.getpid()}.dcm")
        try:
            if self.pool is not None:
                self.pool.warm_up(sample)
            else:
                score_instance(self.pipeline, sample, "warm-up")
        except Exception as exc:  # models that cannot load fail every job with the reason; ingest goes on
            event(log, logging.ERROR, "scoring warm-up failed", error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            sample.unlink(missing_ok=True)
        event(log, logging.INFO, "scoring ready", processes=self.settings.workers.scoring_processes,
              seconds=round(time.perf_counter() - t0, 1))

    def _start_web(self) -> None:
        import uvicorn

        from .triage.web import create_app

        web = self.settings.web
        app = create_app(self.worklist, self.archive.root / "overlays", token=web.token, metrics=self.metrics)
        config = uvicorn.Config(app, host=web.host, port=web.port, log_level="warning", access_log=False)
        self.web_server = uvicorn.Server(config)
        self._spawn("web", self.web_server.run)
        deadline = time.monotonic() + 30
        while not self.web_server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        port = self.web_server.servers[0].sockets[0].getsockname()[1] if self.web_server.servers else web.port
        event(log, logging.INFO, "worklist", url=f"http://{web.host}:{port}/")

    def stop(self) -> None:
        self.stopping.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.web_server is not None:
            self.web_server.should_exit = True
        if self.server is not None:
            self.server.shutdown()
        for thread in self.threads:
            thread.join(timeout=30)
        if self.pool is not None:
            self.pool.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.db.dispose()
        event(log, logging.INFO, "node stopped")

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _worker_id(self) -> str:
        return f"{self.incarnation}:{threading.current_thread().name}"

    def _move_target(self, ae_title: str) -> tuple[str, int, dict] | None:
        peer = self.move_destinations.get(ae_title)
        if peer is None:
            return None
        from .scp.sender import client_tls

        tls = client_tls(peer.tls, peer.host)
        return peer.host, peer.port, ({"tls_args": tls} if tls else {})

    # -- workers ---------------------------------------------------------

    def _work_loop(self, kind: str, process: Any) -> None:
        lease = self.settings.workers.lease_seconds
        worker = self._worker_id()
        while not self.stopping.is_set():
            try:
                job = self.queue.claim(kind, worker, lease)
            except Exception as exc:  # database briefly unavailable: wait and retry
                event(log, logging.ERROR, "claim failed", kind=kind, error=str(exc))
                self.stopping.wait(1.0)
                continue
            if job is None:
                self.queue.wait_for_work(self.settings.workers.poll_seconds)
                continue
            try:
                process(job, worker)
            except LeaseLost:
                event(log, logging.WARNING, "lease lost; result discarded", job=job.id, kind=kind)
            except Exception as exc:
                state = self.queue.fail(job, worker, f"{type(exc).__name__}: {exc}")
                event(log, logging.ERROR, f"{kind} job failed", job=job.id, attempt=job.attempts, next_state=state,
                      error=f"{type(exc).__name__}: {exc}")
                if kind == "score" and state == "failed":
                    self._record_result(job, worker, status="failed", reason="pipeline_error", message=str(exc))

    def _record_result(self, job: Claimed, worker: str, **fields: Any) -> None:
        with self.db.session() as session:
            instance = session.get(Instance, job.instance_id)
            existing = session.scalars(select(ScoreResult).where(ScoreResult.instance_id == job.instance_id)).first()
            row = existing or ScoreResult(instance_id=job.instance_id, study_instance_uid=instance.study_instance_uid)
            for key, value in fields.items():
                setattr(row, key, value)
            session.add(row)
            if fields.get("status") != "failed" and not self.queue.complete(session, job, worker):
                raise LeaseLost()
        self.metrics.scored.labels(outcome=fields.get("reason") or fields.get("status", "")).inc()

    def _score(self, job: Claimed, worker: str) -> None:
        from .inference.instance import InstanceRefused, score_instance

        with self.db.session() as session:
            instance = session.get(Instance, job.instance_id)
        args = (self.archive.path(instance.path), instance.sop_instance_uid,
                self.archive.root / "overlays" / f"{instance.sop_instance_uid}.png")
        jpeg2000 = self.settings.workers.seg_jpeg2000
        if self.pool is not None:
            outcome = self.pool.submit_instance(*args, jpeg2000=jpeg2000).result()
        else:
            outcome = score_instance(self.pipeline, *args, jpeg2000=jpeg2000)
        if isinstance(outcome, InstanceRefused):
            self._record_result(job, worker, status="not_scorable", reason=outcome.reason, message=outcome.detail)
            event(log, logging.WARNING, "not scored", sop_instance_uid=instance.sop_instance_uid, reason=outcome.reason,
                  detail=outcome.detail)
            return
        written = []
        for data, kind in ((outcome.seg, "seg"), (outcome.sr, "sr")):
            obj = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            relative = self.archive.relative_path(obj.StudyInstanceUID, obj.SeriesInstanceUID, obj.SOPInstanceUID)
            sha, size = self.archive.write(relative, data)
            written.append((obj, kind, relative, sha, size))
        with self.db.session() as session:
            ids = {}
            for obj, kind, relative, sha, size in written:
                row = session.scalars(select(Instance).where(Instance.sop_instance_uid == obj.SOPInstanceUID)).first()
                if row is None:
                    row = instance_row(obj, path=relative, sha256=sha, size=size, kind=kind,
                                       derived_from_id=instance.id, calling_aet=self.settings.dicom.ae_title)
                    session.add(row)
                else:  # re-scored with the same models: same UID, refreshed bytes
                    row.path, row.sha256, row.size = relative, sha, size
                session.flush()
                ids[kind] = row.id
                for destination in self.destinations:
                    self.queue.enqueue(session, "send", row.id, destination,
                                       max_attempts=self.settings.workers.max_attempts)
            existing = session.scalars(select(ScoreResult).where(ScoreResult.instance_id == instance.id)).first()
            record = existing or ScoreResult(instance_id=instance.id, study_instance_uid=instance.study_instance_uid)
            record.status, record.reason, record.message = "scored", "", ""
            record.total_score, record.brixia_total = outcome.total, outcome.brixia_total
            record.p_disease = outcome.p_disease
            record.details = json.dumps(outcome.details)
            record.algorithm_version = outcome.algorithm_version
            record.seg_instance_id, record.sr_instance_id = ids["seg"], ids["sr"]
            session.add(record)
            if not self.queue.complete(session, job, worker):
                raise LeaseLost()
        self.metrics.scored.labels(outcome="scored").inc()
        for stage, seconds in outcome.seconds.items():
            self.metrics.latency.labels(stage=stage).observe(seconds)
        event(log, logging.INFO, "scored", sop_instance_uid=instance.sop_instance_uid, total=outcome.total,
              brixia=outcome.brixia_total, p_disease=round(outcome.p_disease, 3),
              ms=round(1000 * sum(outcome.seconds.values())))

    def _send(self, job: Claimed, worker: str) -> None:
        peer: Peer | None = self.destinations.get(job.destination)
        if peer is None:
            self.queue.fail(job, worker, f"destination {job.destination!r} is no longer configured", retry=False)
            return
        with self.db.session() as session:
            instance = session.get(Instance, job.instance_id)
        t0 = time.perf_counter()
        try:
            (status,) = send_files(peer, [self.archive.path(instance.path)], self.settings.dicom.ae_title,
                                   timeout=self.settings.dicom.network_timeout)
        except SendError:
            self.metrics.sent.labels(destination=peer.ae_title, outcome="unreachable").inc()
            raise
        if status not in STORED_STATUSES:
            self.metrics.sent.labels(destination=peer.ae_title, outcome=f"0x{status:04X}").inc()
            raise RuntimeError(f"{peer.ae_title} answered C-STORE status 0x{status:04X}")
        with self.db.session() as session:
            if not self.queue.complete(session, job, worker):
                raise LeaseLost()
        self.metrics.sent.labels(destination=peer.ae_title, outcome="sent").inc()
        self.metrics.latency.labels(stage="send").observe(time.perf_counter() - t0)
        event(log, logging.INFO, "sent", sop_instance_uid=instance.sop_instance_uid, destination=peer.ae_title)

    def _gauge_loop(self) -> None:
        while not self.stopping.wait(2.0):
            try:
                for (kind, state), count in self.queue.depth().items():
                    self.metrics.queue_depth.labels(kind=kind, state=state).set(count)
            except Exception:  # metrics must never take the node down
                pass

    def serve_forever(self) -> None:
        import signal

        self.start()
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop()
