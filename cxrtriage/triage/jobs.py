"""Scheduler jobs: importable functions that read the node's settings when they run.

APScheduler's persistent job store pickles a job's callable by reference and
its arguments by value into the database. So the jobs take no arguments: the
node registers its settings here (:func:`use_settings`) before the scheduler
starts, and a stored job holds nothing but the function's name, never the
web token or a database password. Database engines are cached per URL.

The worklist itself needs no re-ranking job: it is computed from the database
on every request, so every new result and every minute of waiting is in the
order at once. The jobs handle what must happen without anyone looking:
escalation of severe studies left unread, retries of failed work, and purging.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import urllib.request

from sqlalchemy import delete, select, update

from ..config import Settings
from ..observability import event, safe_error
from ..storage.archive import Archive
from ..storage.cluster import SCHEDULER_LEASE, acquire
from ..storage.db import Database
from ..storage.models import Instance, Job, JobKind, JobState, Reading, ScoreResult, as_utc, utcnow
from ..storage.queue import JobQueue
from .preview import plain_path
from .study_rank import refresh_study
from .worklist import Worklist

log = logging.getLogger(__name__)
_databases: dict[str, Database] = {}
_lock = threading.Lock()
_settings: Settings | None = None
_holder: str | None = None
#: The leader's lease lasts this many escalation intervals: a leader that stops renewing (it died) is
#: replaced by the next node whose escalation run comes after the lease expired.
LEASE_INTERVALS = 3


def use_settings(settings: Settings, holder: str | None = None) -> None:
    """The settings the jobs of this process run with (the node calls this before scheduling them), and the
    name under which it competes for the scheduler lease (its incarnation; None: a lone process, always
    in charge)."""
    global _settings, _holder
    _settings, _holder = settings, holder


def _leading(settings: Settings) -> bool:
    """Whether this process runs the periodic jobs now: it holds, or has just taken, the scheduler lease
    (:mod:`cxrtriage.storage.cluster`). With several nodes on one database, exactly one does."""
    if _holder is None:
        return True
    seconds = LEASE_INTERVALS * settings.triage.escalation.interval_seconds
    with _database(settings.storage.database_url).session() as session:
        return acquire(session, SCHEDULER_LEASE, _holder, seconds)


def _current(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    if _settings is None:
        raise RuntimeError("scheduler job run before use_settings(): no settings registered in this process")
    return _settings


def _database(url: str) -> Database:
    with _lock:
        if url not in _databases:
            _databases[url] = Database(url)
        return _databases[url]


def _post(url: str, payload: dict, timeout: float) -> None:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status >= 300:
            raise OSError(f"webhook answered HTTP {response.status}")


def escalate_overdue(settings: Settings | None = None) -> int:
    """Escalate severe unread studies past their deadline, each exactly once; returns how many."""
    settings = _current(settings)
    if not _leading(settings):
        return 0
    rules = settings.triage.escalation
    db = _database(settings.storage.database_url)
    worklist = Worklist(db, settings.triage.priority)
    fired = 0
    for entry in worklist.entries(details=False):  # band, totals and labels come from the summary columns
        deadline = rules.deadline_minutes.get(entry.priority.band)
        if deadline is None or entry.priority.waited_minutes < deadline or "escalated" in entry.priority.flags:
            continue
        payload = {
            "event": "cxrtriage.escalation",
            "study_instance_uid": entry.study_instance_uid,
            "accession_number": entry.accession_number,
            "band": entry.priority.band,
            "total_score": entry.total_score,
            "p_disease": entry.p_disease,
            "waited_minutes": round(entry.priority.waited_minutes, 1),
            "deadline_minutes": deadline,
            "reading_state": entry.reading_state,
        }
        # The webhook's receiver (a paging system) needs the accession number; the log names the study by UID.
        logged = {k: v for k, v in payload.items() if k != "accession_number"}
        if rules.webhook_url:
            try:
                _post(rules.webhook_url, payload, rules.webhook_timeout_seconds)
            except OSError as exc:  # not marked: the next run tries again
                event(log, logging.ERROR, "escalation webhook failed", error=safe_error(exc), **logged)
                continue
        if worklist.mark_escalated(entry.study_instance_uid):
            fired += 1
            event(log, logging.WARNING, "escalated", **logged)
    return fired


def retry_failed(settings: Settings | None = None) -> int:
    """Give failed scoring and sending jobs a fresh set of attempts."""
    settings = _current(settings)
    if not _leading(settings):
        return 0
    queue = JobQueue(_database(settings.storage.database_url))
    count = queue.retry_failed(JobKind.SEND) + queue.retry_failed(JobKind.SCORE)
    if count:
        event(log, logging.INFO, "retrying failed jobs", jobs=count)
    return count


def purge(settings: Settings | None = None) -> int:
    """Delete studies older than the retention that are read and fully sent; returns how many.

    Never purged: unread or claimed studies, and studies with any job not done.
    """
    settings = _current(settings)
    days = settings.triage.retention_days
    if not days or not _leading(settings):
        return 0
    db = _database(settings.storage.database_url)
    archive = Archive(settings.storage.archive_dir)
    cutoff = utcnow() - dt.timedelta(days=days)
    purged = 0
    with db.session() as session:
        read = set(session.scalars(select(Reading.study_instance_uid).where(Reading.state == "read")))
        rows = session.scalars(select(Instance).where(Instance.study_instance_uid.in_(read))).all()
        by_study: dict[str, list[Instance]] = {}
        for row in rows:
            by_study.setdefault(row.study_instance_uid, []).append(row)
        for uid, instances in by_study.items():
            ids = [i.id for i in instances]
            newest = max(as_utc(i.received_at) for i in instances)
            open_jobs = session.scalar(
                select(Job.id).where(Job.instance_id.in_(ids), Job.state != JobState.DONE).limit(1)
            )
            if newest > cutoff or open_jobs is not None:
                continue
            for instance in instances:
                archive.remove(instance.path)
                archive.overlay_path(instance.sop_instance_uid).unlink(missing_ok=True)
                plain_path(archive, instance.sop_instance_uid).unlink(missing_ok=True)
            session.execute(delete(Job).where(Job.instance_id.in_(ids)))
            session.execute(delete(ScoreResult).where(ScoreResult.instance_id.in_(ids)))
            unlink = update(Instance).where(Instance.id.in_(ids)).values(duplicate_of_id=None, derived_from_id=None)
            session.execute(unlink)
            session.execute(delete(Instance).where(Instance.id.in_(ids)))
            session.execute(delete(Reading).where(Reading.study_instance_uid == uid))
            refresh_study(session, uid)  # no source image left: its ranking row goes
            purged += 1
            event(log, logging.INFO, "purged", study_instance_uid=uid, instances=len(ids))
    return purged
