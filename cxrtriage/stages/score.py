"""The score stage: one received image in, its SEG, SR, catalog rows, send jobs and result out.

The scorer (in this process, or in a pool of worker processes) returns the
encoded SEG and SR with their UIDs, and with ``results.secondary_capture``
a Secondary Capture image (kind ``sc``). This stage then

1. writes every file durably to the archive (same UIDs on a re-run: the
   files are replaced, never duplicated);
2. in one transaction: a catalog row for each (the source's patient and
   study, the object's own UIDs and series), one ``send`` job per result
   object and destination, the result row, and the job marked done; a lost
   lease rolls all of it back (:class:`~.lease_loop.LeaseLost`).

Images the reader cannot score are recorded ``not_scorable`` with its
reason; a job that fails for good is recorded ``failed``.

The overlay PNG is not drawn here: the study page's first request draws it
from the archived source and SEG (:func:`~cxrtriage.triage.preview.overlay_image`);
a re-score removes the one kept from the previous result.

Scoring output (SEG, SR) respects ``storage.min_free_mb``, the
floor below which ingest answers C-STORE with 0xA700: with less free
space the job is not scored and writes nothing; it is deferred
(:meth:`~cxrtriage.storage.queue.JobQueue.defer`: back to pending after a
backoff, its attempt not spent), so a full disk never fails a job for good
and scoring resumes by itself once space is freed. The image itself is
already durable: nothing acknowledged is at risk.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..config import InferenceSettings
from ..dicom_header import EncodedObject
from ..inference.instance import InstanceRefused, InstanceScored
from ..observability import Metrics, event, safe_error
from ..storage.archive import Archive
from ..storage.catalog import derived_row
from ..storage.db import Database
from ..storage.models import Instance, JobKind, ResultStatus, ScoreResult
from ..storage.queue import Claimed, JobQueue
from ..triage.study_rank import refresh_study
from .lease_loop import LeaseLost

if TYPE_CHECKING:
    from ..inference.parallel import ScoringPool
    from ..inference.pipeline import Pipeline

log = logging.getLogger(__name__)

Outcome = InstanceScored | InstanceRefused


class Scorer(Protocol):
    """Scores the DICOM file at ``path`` (an archived image), writing its overlay PNG to ``overlay`` when given
    (the score stage gives None: the web page draws the overlay on first request)."""

    def __call__(self, path: Path, sop_instance_uid: str, overlay: Path | None) -> Outcome: ...

    def warm_up(self, sample: Path) -> None:
        """Load the models and pay first-call costs on ``sample``."""

    def close(self) -> None:
        """Release worker processes, if any."""


class LocalScorer:
    """Scores in the calling thread; the pipeline is loaded on first use, once, shared by all threads."""

    def __init__(
        self, settings: InferenceSettings, *, jpeg2000: bool = False, pipeline: Pipeline | None = None,
        secondary_capture: bool = False,
    ) -> None:
        self.settings = settings
        self.jpeg2000 = jpeg2000
        self.secondary_capture = secondary_capture  # results.secondary_capture
        self._pipeline = pipeline
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> Pipeline:
        with self._lock:
            if self._pipeline is None:
                from ..inference.pipeline import Pipeline

                self._pipeline = Pipeline(self.settings)
            return self._pipeline

    def __call__(self, path: Path, sop_instance_uid: str, overlay: Path | None) -> Outcome:
        from ..inference.instance import score_instance

        return score_instance(self.pipeline, path, sop_instance_uid, overlay, jpeg2000=self.jpeg2000,
                              secondary_capture=self.secondary_capture)

    def warm_up(self, sample: Path) -> None:
        self(sample, "warm-up", None)

    def close(self) -> None:
        pass


class PoolScorer:
    """Scores in a :class:`~cxrtriage.inference.parallel.ScoringPool`; the calling thread waits for its result."""

    def __init__(self, pool: ScoringPool, *, jpeg2000: bool = False, secondary_capture: bool = False) -> None:
        self.pool = pool
        self.jpeg2000 = jpeg2000
        self.secondary_capture = secondary_capture  # results.secondary_capture

    def __call__(self, path: Path, sop_instance_uid: str, overlay: Path | None) -> Outcome:
        future = self.pool.submit_instance(path, sop_instance_uid, overlay, jpeg2000=self.jpeg2000,
                                           secondary_capture=self.secondary_capture)
        return future.result()

    def warm_up(self, sample: Path) -> None:
        self.pool.warm_up(sample)

    def close(self) -> None:
        self.pool.close()


def warm_up(scorer: Scorer, scratch: Path, processes: int) -> bool:
    """Score a small phantom before accepting work; False (and logged) when the models cannot load.

    The first SEG + SR a process builds costs about a second more than the
    next (imports, highdicom's first use); the first real image should not
    wait for that. A scorer that cannot load fails every job with the
    reason; ingest goes on.
    """
    from ..inference.phantom import PhantomGenerator, write_cr

    t0 = time.perf_counter()
    sample = write_cr(PhantomGenerator(320, 288)(0), scratch / f"warm-up-{os.getpid()}.dcm")
    try:
        scorer.warm_up(sample)
    except Exception as exc:
        event(log, logging.ERROR, "scoring warm-up failed", error=safe_error(exc))
        return False
    finally:
        sample.unlink(missing_ok=True)
    event(log, logging.INFO, "scoring ready", processes=processes, seconds=round(time.perf_counter() - t0, 1))
    return True


class ScoreStage:
    """Runs a ``score`` job: ``stage(job, worker)``; :meth:`record_failed` once it has failed for good."""

    def __init__(
        self, db: Database, archive: Archive, queue: JobQueue, metrics: Metrics, scorer: Callable[..., Outcome], *,
        destinations: Sequence[str], ae_title: str, max_attempts: int, min_free_bytes: int = 0,
    ) -> None:
        self.db = db
        self.archive = archive
        self.queue = queue
        self.metrics = metrics
        self.scorer = scorer
        self.destinations = tuple(destinations)
        self.ae_title = ae_title  # recorded as the calling AE of the objects the node writes
        self.max_attempts = max_attempts
        self.min_free_bytes = min_free_bytes  # storage.min_free_mb: no scoring output below it

    def __call__(self, job: Claimed, worker: str) -> None:
        with self.db.session() as session:
            source = session.get(Instance, job.instance_id)
        assert source is not None, f"score job {job.id} names no stored instance"
        if self._short_of_space(job, worker):
            return
        # No overlay: drawn lazily, when the web page first asks for it (about 100 CPU-ms an image saved).
        outcome = self.scorer(self.archive.path(source.path), source.sop_instance_uid, None)
        if isinstance(outcome, InstanceRefused):
            self.record_refused(job, worker, source, outcome)
        else:
            self.record_scored(job, worker, source, outcome)

    def allow(self, worker: str) -> bool:
        """The claim gate of the score workers: nothing is claimed below the floor, so a full disk costs
        no claim-and-defer writes per job (:class:`~cxrtriage.storage.queue.ClaimGate`)."""
        return self.archive.free_bytes() >= self.min_free_bytes

    def release(self, worker: str) -> None:
        """Nothing is reserved by :meth:`allow`."""

    def _short_of_space(self, job: Claimed, worker: str) -> bool:
        """Below the free-space floor (space can go between claim and write): defer the job (attempt not
        spent) and say so; nothing is written."""
        free = self.archive.free_bytes()
        if free >= self.min_free_bytes:
            return False
        delay = self.queue.backoff_base
        reason = (f"archive disk has {free // 2**20} MB free, below storage.min_free_mb "
                  f"{self.min_free_bytes // 2**20}: scoring deferred")
        if not self.queue.defer(job, worker, reason, delay):
            raise LeaseLost()
        self.metrics.scored.labels(outcome="deferred_disk_full").inc()
        event(log, logging.WARNING, "scoring deferred: disk below min_free_mb", job=job.id,
              free_mb=free // 2**20, min_free_mb=self.min_free_bytes // 2**20, retry_in_seconds=delay)
        return True

    def record_scored(self, job: Claimed, worker: str, source: Instance, scored: InstanceScored) -> None:
        """Store the SEG, SR (and SC), then catalog, queue their sends and record the result in one transaction."""
        stored = [(obj, *self._store(obj)) for obj in scored.objects]  # durable on disk before any row names them
        with self.db.session() as session:
            ids: dict[str, int] = {}
            for obj, relative, sha, size in stored:
                row = self._catalog(session, obj, source, relative, sha, size)
                ids[obj.kind] = row.id
                for destination in self.destinations:
                    self.queue.enqueue(session, JobKind.SEND, row.id, destination, max_attempts=self.max_attempts)
            self._set_result(
                session, source, status=ResultStatus.SCORED, reason="", message="", total_score=scored.total,
                brixia_total=scored.brixia_total, p_disease=scored.p_disease, details=json.dumps(scored.details),
                zones_scored=scored.details["zones_scored"],
                algorithm_version=scored.algorithm_version, seg_instance_id=ids["seg"], sr_instance_id=ids["sr"],
            )
            if not self.queue.complete(session, job, worker):
                raise LeaseLost()
        # The overlay kept for an earlier result would show old scores: the next request draws the new one.
        self.archive.overlay_path(source.sop_instance_uid).unlink(missing_ok=True)
        self.metrics.scored.labels(outcome=ResultStatus.SCORED).inc()
        for stage, seconds in scored.seconds.items():
            self.metrics.latency.labels(stage=stage).observe(seconds)
        event(log, logging.INFO, "scored", sop_instance_uid=source.sop_instance_uid, total=scored.total,
              brixia=scored.brixia_total, p_disease=round(scored.p_disease, 3),
              ms=round(1000 * sum(scored.seconds.values())))

    def record_refused(self, job: Claimed, worker: str, source: Instance, refused: InstanceRefused) -> None:
        """Record an image the reader cannot score, with its reason; the job is done."""
        with self.db.session() as session:
            self._set_result(session, source, status=ResultStatus.NOT_SCORABLE, reason=refused.reason,
                             message=refused.detail)
            if not self.queue.complete(session, job, worker):
                raise LeaseLost()
        self.metrics.scored.labels(outcome=refused.reason or ResultStatus.NOT_SCORABLE).inc()
        event(log, logging.WARNING, "not scored", sop_instance_uid=source.sop_instance_uid, reason=refused.reason,
              detail=refused.detail)

    def record_failed(self, job: Claimed, worker: str, error: Exception) -> None:
        """Record a job that failed for good (the queue has marked it failed already)."""
        with self.db.session() as session:
            source = session.get(Instance, job.instance_id)
            assert source is not None, f"score job {job.id} names no stored instance"
            self._set_result(session, source, status=ResultStatus.FAILED, reason="pipeline_error",
                             message=_message(error))
        self.metrics.scored.labels(outcome="pipeline_error").inc()

    def _store(self, obj: EncodedObject) -> tuple[str, str, int]:
        relative = self.archive.relative_path(obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid)
        sha, size = self.archive.write(relative, obj.data)
        return relative, sha, size

    def _catalog(self, session: Session, obj: EncodedObject, source: Instance, relative: str, sha: str,
                 size: int) -> Instance:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == obj.sop_instance_uid)).first()
        if row is None:
            row = derived_row(obj, source, path=relative, sha256=sha, size=size, calling_aet=self.ae_title)
            session.add(row)
        else:  # re-scored with the same models: same UID, refreshed bytes
            row.path, row.sha256, row.size = relative, sha, size
        session.flush()
        return row

    @staticmethod
    def _set_result(session: Session, source: Instance, **fields: Any) -> None:
        row = session.scalars(select(ScoreResult).where(ScoreResult.instance_id == source.id)).first()
        row = row or ScoreResult(instance_id=source.id, study_instance_uid=source.study_instance_uid)
        for key, value in fields.items():
            setattr(row, key, value)
        session.add(row)
        session.flush()
        refresh_study(session, source.study_instance_uid)


def _message(error: Exception) -> str:
    """The scrubbed error text without its type name (the result's reason already says what failed)."""
    text = safe_error(error)
    prefix = f"{type(error).__name__}: "
    return text[len(prefix):] if text.startswith(prefix) else text
