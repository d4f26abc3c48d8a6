"""The worker loop: claim a job with a lease, run its stage, record the outcome.

A stage is any callable ``(job, worker) -> None`` that marks the job done
inside the transaction that records its work (``JobQueue.complete``) and
raises :class:`LeaseLost` when that fails: another worker took the job
over, so this worker's transaction is rolled back and the other one's
result stands. Any other exception fails the job: back to pending after a
backoff, or failed for good after ``max_attempts`` (at once for
:class:`GiveUp`), when ``on_failed`` runs.

The database going away (PostgreSQL restarting or failing over) is nobody's
fault: a stage that fails on it has its job put back without spending the
attempt, and the queue updates that record an outcome are retried with
backoff until the database answers (at most for the job's lease: after
that another worker may hold it). So the loop survives an outage and
resumes by itself, and no job is left leased for a whole lease period.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..observability import event, safe_error
from ..storage.db import database_unreachable
from ..storage.models import JobKind, JobState
from ..storage.queue import Claimed, JobQueue

log = logging.getLogger(__name__)

#: Runs one claimed job: ``(job, worker)``.
Stage = Callable[[Claimed, str], None]
#: Called once a job has failed for good: ``(job, worker, the last error)``.
FailureHook = Callable[[Claimed, str, Exception], None]
T = TypeVar("T")
#: Longest wait between two tries of a queue update while the database is away.
RECORD_BACKOFF_CAP = 5.0


class LeaseLost(RuntimeError):
    """Another worker took the job over; this worker's results are rolled back."""


class GiveUp(RuntimeError):
    """The job can never succeed (its destination is gone, say): failed for good, no retry."""


class Turn(enum.StrEnum):
    """What one turn of the loop did."""

    IDLE = "idle"  # no job ready
    CLAIM_FAILED = "claim_failed"  # the database did not answer
    DONE = "done"
    RETRYING = "retrying"  # failed, back to pending after a backoff
    FAILED = "failed"  # failed for good
    LEASE_LOST = "lease_lost"


@dataclass
class LeaseLoop:
    """One worker: takes jobs of ``kind`` from ``queue`` and runs ``stage`` on each until ``stopping`` is set."""

    queue: JobQueue
    kind: JobKind
    stage: Stage
    worker: str
    lease_seconds: float
    poll_seconds: float
    stopping: threading.Event
    on_failed: FailureHook | None = None

    def run(self) -> None:
        """Turn until stopped; idle, wait for new work (woken at once by a job committed in this process)."""
        while not self.stopping.is_set():
            turn = self.turn()
            if turn is Turn.CLAIM_FAILED:
                self.stopping.wait(1.0)
            elif turn is Turn.IDLE:
                self.queue.wait_for_work(self.poll_seconds)

    def turn(self) -> Turn:
        """Claim one job and run it; never raises."""
        try:
            job = self.queue.claim(self.kind, self.worker, self.lease_seconds)
        except Exception as exc:  # database briefly unavailable: the caller waits and retries
            event(log, logging.ERROR, "claim failed", kind=self.kind, error=safe_error(exc))
            return Turn.CLAIM_FAILED
        if job is None:
            return Turn.IDLE
        try:
            self.stage(job, self.worker)
        except LeaseLost:
            event(log, logging.WARNING, "lease lost; result discarded", job=job.id, kind=self.kind)
            return Turn.LEASE_LOST
        except Exception as exc:
            return self._failed(job, exc)
        return Turn.DONE

    def _record(self, update: Callable[[], T]) -> T:
        """Run a queue update, tried again with backoff while the database is away, until the job's lease
        would have run out or the loop stops; then the last error is raised."""
        deadline = time.monotonic() + self.lease_seconds
        delay = 0.2
        while True:
            try:
                return update()
            except Exception as exc:
                if not database_unreachable(exc) or self.stopping.is_set() or time.monotonic() + delay > deadline:
                    raise
            self.stopping.wait(delay)
            delay = min(delay * 2, RECORD_BACKOFF_CAP)

    def _database_away(self, job: Claimed, error: str) -> Turn:
        """The stage failed because the database went away: the job goes back, its attempt not spent, after
        the queue's first backoff (an error that only looks like an outage must not spin)."""
        event(log, logging.WARNING, "database unavailable; job put back", job=job.id, kind=self.kind, error=error)
        delay = self.queue.backoff_base
        try:
            kept = self._record(lambda: self.queue.defer(job, self.worker, f"database unavailable: {error}", delay))
        except Exception as db_error:  # still away: the lease runs out and the job is claimed again
            event(log, logging.ERROR, "recording the failure failed", job=job.id, kind=self.kind,
                  error=safe_error(db_error))
            return Turn.CLAIM_FAILED
        return Turn.RETRYING if kept else Turn.LEASE_LOST

    def _failed(self, job: Claimed, exc: Exception) -> Turn:
        # Scrubbed: a database error's text carries the bound values (patient name, ID, ...) of its statement.
        error = safe_error(exc)
        if database_unreachable(exc):
            return self._database_away(job, error)
        try:
            state = self._record(lambda: self.queue.fail(job, self.worker, error, retry=not isinstance(exc, GiveUp)))
        except Exception as db_error:  # not recorded: the lease runs out and the job is claimed again
            event(log, logging.ERROR, "recording the failure failed", job=job.id, kind=self.kind,
                  error=safe_error(db_error))
            return Turn.CLAIM_FAILED
        if state is None:  # another worker took the job over: its outcome stands, this failure is not recorded
            event(log, logging.WARNING, "lease lost; failure discarded", job=job.id, kind=self.kind)
            return Turn.LEASE_LOST
        event(log, logging.ERROR, f"{self.kind} job failed", job=job.id, attempt=job.attempts, next_state=state,
              error=error)
        if state is not JobState.FAILED:
            return Turn.RETRYING
        if self.on_failed is not None:
            try:
                self.on_failed(job, self.worker, exc)
            except Exception as hook_error:  # the job stays failed; the loop must live on
                event(log, logging.ERROR, "recording the failure failed", job=job.id, kind=self.kind,
                      error=safe_error(hook_error))
        return Turn.FAILED
