"""The durable job queue, in the database.

Workers claim one job at a time with a lease. A job whose lease expires
(its worker crashed or hung) is claimable again, so it is re-run; a job
that fails is retried with exponential backoff until ``max_attempts``,
then stays ``failed`` with its last error. Claiming is race-free on both
databases: SQLite transactions start with ``BEGIN IMMEDIATE`` (see
:mod:`.db`), PostgreSQL uses ``SELECT ... FOR UPDATE SKIP LOCKED`` so
concurrent workers skip each other's rows instead of waiting.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass

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


class JobQueue:
    def __init__(self, db: Database, backoff_base: float = 5.0, backoff_cap: float = 600.0) -> None:
        self.db = db
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        # Wakes this process's idle workers when a job it enqueued is committed;
        # polling remains for jobs from other processes and for retries.
        self._new_work = threading.Condition()

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

    def claim(self, kind: JobKind, worker: str, lease_seconds: float) -> Claimed | None:
        """Take the most urgent ready job of ``kind`` (or an expired lease), or None."""
        now = utcnow()
        ready = or_(
            and_(Job.state == JobState.PENDING, Job.available_at <= now),
            and_(Job.state == JobState.RUNNING, Job.lease_until < now),
        )
        query = (
            select(Job).where(Job.kind == kind, ready)
            .order_by(Job.priority.desc(), Job.available_at, Job.id).limit(1)
        )
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

    def retry_failed(self, kind: JobKind | None = None) -> int:
        """Give failed jobs a fresh set of attempts (an operator's or the scheduler's decision)."""
        query = update(Job).where(Job.state == JobState.FAILED)
        if kind:
            query = query.where(Job.kind == kind)
        with self.db.session() as session:
            return rowcount(session.execute(
                query.values(state=JobState.PENDING, attempts=0, available_at=utcnow(), finished_at=None)
            ))

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
