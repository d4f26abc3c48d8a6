"""The durable job queue, in the database.

Workers claim one job at a time with a lease. A job whose lease expires
(its worker crashed or hung) is claimable again, so it is re-run; a job
that fails is retried with exponential backoff until ``max_attempts``,
then stays ``failed`` with its last error. Claiming is race-free on both
databases: SQLite transactions start with ``BEGIN IMMEDIATE`` (see
:mod:`.db`), PostgreSQL uses ``SELECT ... FOR UPDATE SKIP LOCKED`` so
concurrent workers skip each other's rows instead of waiting.

A :class:`DestinationQueue` is the queue as one send destination's workers
see it: they claim only that destination's jobs, and only while its claim
gate (the destination's circuit breaker) lets them, so one destination's
state never holds up another's. :meth:`JobQueue.defer` puts a job back
without spending its attempt, for a cause outside the job (the
destination's circuit is open, the disk is short of space).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Update, and_, func, or_, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from .db import Database, is_sqlite, rowcount, upsert_insert
from .models import Job, JobKind, JobState, utcnow


@dataclass(frozen=True)
class Claimed:
    """A job this worker holds the lease of: the typed task handed to a stage."""

    id: int
    kind: JobKind
    instance_id: int
    destination: str
    attempts: int
    max_attempts: int


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempts`` (1-based): base, 2 base, 4 base, ... capped."""
    return min(cap, base * 2 ** max(0, attempts - 1))


class ClaimGate(Protocol):
    """Says whether a worker may claim now (a destination's circuit breaker is one)."""

    def allow(self, worker: str) -> bool:
        """Whether ``worker`` may claim; may reserve something (a half-open trial) for it."""

    def release(self, worker: str) -> None:
        """``worker`` claimed nothing after all: give back what :meth:`allow` reserved."""


class JobQueue:
    def __init__(self, db: Database, backoff_base: float = 5.0, backoff_cap: float = 600.0) -> None:
        self.db = db
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        # Wakes this process's idle workers when a job it enqueued is committed;
        # polling remains for jobs from other processes and for retries.
        self._new_work = threading.Condition()

    def for_destination(self, destination: str, gate: ClaimGate | None = None) -> DestinationQueue:
        """This queue as the send workers of ``destination`` see it."""
        return DestinationQueue(self, destination=destination, gate=gate)

    def gated(self, gate: ClaimGate) -> DestinationQueue:
        """This queue, claiming only while ``gate`` allows (the score workers' disk floor is one)."""
        return DestinationQueue(self, gate=gate)

    def for_other_destinations(self, configured: Collection[str]) -> DestinationQueue:
        """This queue as the worker for send jobs to destinations no longer configured sees it."""
        return DestinationQueue(self, not_in=frozenset(configured))

    def _announce(self, _session: Session) -> None:
        with self._new_work:
            self._new_work.notify_all()

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until a job is committed in this process, at most ``timeout`` seconds."""
        with self._new_work:
            self._new_work.wait(timeout)

    def enqueue(
        self, session: Session, kind: JobKind, instance_id: int, destination: str = "", *, priority: int = 0,
        max_attempts: int = 5,
    ) -> None:
        """Add a job inside the caller's transaction; an identical job already queued is kept as is."""
        values = dict(
            kind=kind, instance_id=instance_id, destination=destination, priority=priority, state=JobState.PENDING,
            attempts=0, max_attempts=max_attempts, available_at=utcnow(), created_at=utcnow(),
            worker="", last_error="",
        )
        session.execute(upsert_insert(self.db.engine, Job).values(**values).on_conflict_do_nothing())
        sa_event.listen(session, "after_commit", self._announce, once=True)

    def claim(
        self, kind: JobKind, worker: str, lease_seconds: float, *, destination: str | None = None,
        not_in: Collection[str] = (),
    ) -> Claimed | None:
        """Take the most urgent ready job of ``kind`` (or an expired lease), or None.

        ``destination``: only jobs for it; ``not_in``: no jobs for these destinations.
        """
        now = utcnow()
        ready = or_(
            and_(Job.state == JobState.PENDING, Job.available_at <= now),
            and_(Job.state == JobState.RUNNING, Job.lease_until < now),
        )
        query = select(Job).where(Job.kind == kind, ready)
        if destination is not None:
            query = query.where(Job.destination == destination)
        if not_in:
            query = query.where(Job.destination.notin_(sorted(not_in)))
        query = query.order_by(Job.priority.desc(), Job.available_at, Job.id).limit(1)
        if not is_sqlite(self.db.engine):
            query = query.with_for_update(skip_locked=True)
        with self.db.session() as session:
            job = session.scalars(query).first()
            if job is None:
                return None
            job.state = JobState.RUNNING
            job.attempts += 1
            job.worker = worker
            job.lease_until = now + dt.timedelta(seconds=lease_seconds)
            return Claimed(job.id, JobKind(job.kind), job.instance_id, job.destination, job.attempts, job.max_attempts)

    def _owned(self, job_id: int, worker: str) -> Update:
        return update(Job).where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)

    def complete(self, session: Session, job: Claimed, worker: str) -> bool:
        """Mark done inside the caller's transaction; False if the lease was lost meanwhile."""
        owned = self._owned(job.id, worker)
        return rowcount(session.execute(owned.values(state=JobState.DONE, finished_at=utcnow(), lease_until=None))) == 1

    def fail(self, job: Claimed, worker: str, error: str, *, retry: bool = True) -> JobState | None:
        """Record a failure: back to pending after a backoff, or failed for good. Returns the new state,
        or None when the lease was lost meanwhile (another worker holds the job: nothing is changed)."""
        final = not retry or job.attempts >= job.max_attempts
        delay = backoff_seconds(job.attempts, self.backoff_base, self.backoff_cap)
        state = JobState.FAILED if final else JobState.PENDING
        values = dict(
            state=state,
            last_error=error[:4000],
            lease_until=None,
            available_at=utcnow() + dt.timedelta(seconds=0 if final else delay),
            finished_at=utcnow() if final else None,
        )
        with self.db.session() as session:
            changed = rowcount(session.execute(self._owned(job.id, worker).values(**values)))
        return state if changed == 1 else None

    def defer(self, job: Claimed, worker: str, reason: str, delay_seconds: float) -> bool:
        """Back to pending after ``delay_seconds`` without spending the attempt it was claimed with.

        For a cause outside the job (its destination's circuit is open, the
        archive disk is short of space): however long that lasts, the job is
        retried, never failed for good by it. False if the lease was lost.
        """
        values = dict(
            state=JobState.PENDING, attempts=max(0, job.attempts - 1), last_error=reason[:4000], lease_until=None,
            available_at=utcnow() + dt.timedelta(seconds=max(0.0, delay_seconds)), finished_at=None,
        )
        with self.db.session() as session:
            return rowcount(session.execute(self._owned(job.id, worker).values(**values))) == 1

    def retry_failed(self, kind: JobKind | None = None) -> int:
        """Give failed jobs a fresh set of attempts (an operator's or the scheduler's decision)."""
        query = update(Job).where(Job.state == JobState.FAILED)
        if kind:
            query = query.where(Job.kind == kind)
        with self.db.session() as session:
            return rowcount(session.execute(
                query.values(state=JobState.PENDING, attempts=0, available_at=utcnow(), finished_at=None)
            ))

    def retry_ids(self, ids: Collection[int]) -> int:
        """Give the failed jobs among ``ids`` a fresh set of attempts, available now; returns how many."""
        if not ids:
            return 0
        with self.db.session() as session:
            return rowcount(session.execute(
                update(Job).where(Job.state == JobState.FAILED, Job.id.in_(sorted(ids)))
                .values(state=JobState.PENDING, attempts=0, available_at=utcnow(), finished_at=None)
            ))

    def resend(self, session: Session, instance_id: int, destination: str, *, max_attempts: int = 5) -> None:
        """Queue a send of ``instance_id`` to ``destination`` inside the caller's transaction.

        A new job, or the existing one (unique on kind, instance, destination)
        back to pending with its attempts reset; a job a worker holds right
        now is left to that worker.
        """
        values = dict(
            kind=JobKind.SEND, instance_id=instance_id, destination=destination, priority=0, state=JobState.PENDING,
            attempts=0, max_attempts=max_attempts, available_at=utcnow(), created_at=utcnow(), worker="",
            last_error="",
        )
        insert = upsert_insert(self.db.engine, Job).values(**values)
        again = dict(state=JobState.PENDING, attempts=0, available_at=utcnow(), finished_at=None, lease_until=None,
                     last_error="")
        session.execute(insert.on_conflict_do_update(
            index_elements=[Job.kind, Job.instance_id, Job.destination], set_=again,
            where=Job.state != JobState.RUNNING,
        ))
        sa_event.listen(session, "after_commit", self._announce, once=True)

    def jobs(self, *, state: JobState | None = None, kind: JobKind | None = None, limit: int = 50) -> list[Job]:
        """The most recently created jobs (of ``state`` and ``kind``), newest first, for an operator's listing."""
        query = select(Job)
        if state is not None:
            query = query.where(Job.state == state)
        if kind is not None:
            query = query.where(Job.kind == kind)
        with self.db.session() as session:
            return list(session.scalars(query.order_by(Job.id.desc()).limit(limit)))

    def release_worker(self, worker_prefix: str, keep: str) -> int:
        """Re-queue jobs leased by earlier runs of this node (``worker_prefix``), not by ``keep``.

        Called at start-up: a previous process of the same node is certainly
        dead, so its leases need not run out first.
        """
        with self.db.session() as session:
            return rowcount(session.execute(
                update(Job)
                .where(
                    Job.state == JobState.RUNNING, Job.worker.like(f"{worker_prefix}%"), Job.worker.notlike(f"{keep}%")
                )
                .values(state=JobState.PENDING, lease_until=None, available_at=utcnow())
            ))

    def depth(self) -> dict[tuple[str, str], int]:
        """Number of jobs by (kind, state), for the queue-depth gauge."""
        with self.db.session() as session:
            rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
            return {(kind, state): count for kind, state, count in rows}


class DestinationQueue(JobQueue):
    """The queue seen by the send workers of one destination (or of all destinations not configured).

    Shares the database and the wake-ups of the queue it narrows. A claim
    asks the gate first: a destination whose circuit is open has nothing
    claimed, so its jobs keep their attempts until it is tried again.
    """

    def __init__(self, queue: JobQueue, *, destination: str | None = None, not_in: frozenset[str] = frozenset(),
                 gate: ClaimGate | None = None) -> None:
        super().__init__(queue.db, queue.backoff_base, queue.backoff_cap)
        self._new_work = queue._new_work
        self.destination = destination
        self.not_in = not_in
        self.gate = gate

    def claim(
        self, kind: JobKind, worker: str, lease_seconds: float, *, destination: str | None = None,
        not_in: Collection[str] = (),
    ) -> Claimed | None:
        """Claim as :meth:`JobQueue.claim`, narrowed to this view's destinations (the keyword arguments are
        ignored: a view never claims outside them), and only while the gate allows."""
        if self.gate is not None and not self.gate.allow(worker):
            return None
        job: Claimed | None = None
        try:
            job = super().claim(kind, worker, lease_seconds, destination=self.destination, not_in=self.not_in)
        finally:
            if job is None and self.gate is not None:
                self.gate.release(worker)
        return job
