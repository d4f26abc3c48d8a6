"""The node's APScheduler 3 jobs (see :mod:`.jobs`).

Escalation runs every few seconds from memory. Retrying failed work and
purging are kept in the database (APScheduler's SQLAlchemy job store, table
``apscheduler_jobs``) so that a run missed while the node was down happens
when it comes back. A stored job is the function's name only (replacing, at
start-up, any job an older version stored with the settings as arguments).

Every node runs this scheduler, but a job does its work only in the process
holding the ``scheduler`` lease in the database (storage/cluster.py), so
with several nodes on one PostgreSQL each escalation, retry and purge
happens once; when the leader dies, another node takes over once its lease
expires (three escalation intervals).
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import Settings
from ..observability import event, safe_error
from ..storage.cluster import SCHEDULER_LEASE, release
from ..storage.db import Database
from .jobs import escalate_overdue, purge, retry_failed, use_settings

log = logging.getLogger(__name__)


def start_scheduler(settings: Settings, engine: Any, holder: str | None = None) -> Any:
    """Start the jobs; ``holder`` (the node's incarnation) competes for the scheduler lease, so that with
    several nodes on one database one of them runs them (:func:`.jobs._leading`)."""
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(
        jobstores={"default": MemoryJobStore(), "persistent": SQLAlchemyJobStore(engine=engine)}, timezone="UTC"
    )
    use_settings(settings, holder)  # the jobs read them when they run: a stored job holds no settings (no secrets)
    triage = settings.triage
    common = {"args": [], "coalesce": True, "max_instances": 1}
    scheduler.add_job(escalate_overdue, "interval", seconds=triage.escalation.interval_seconds, id="escalate", **common)
    scheduler.add_job(retry_failed, "interval", minutes=triage.retry_failed_minutes, id="retry_failed",
                      jobstore="persistent", replace_existing=True, misfire_grace_time=3600, **common)
    scheduler.add_job(purge, "interval", hours=triage.purge_interval_hours, id="purge",
                      jobstore="persistent", replace_existing=True, misfire_grace_time=86400, **common)
    scheduler.start()
    return scheduler


def stop_scheduler(scheduler: Any, db: Database, holder: str) -> None:
    """Stop the jobs and give the scheduler lease up, so another node takes over at once, not after it expires."""
    scheduler.shutdown(wait=False)
    try:
        with db.session() as session:
            release(session, SCHEDULER_LEASE, holder)
    except Exception as exc:  # the database is away: the lease simply expires
        event(log, logging.WARNING, "scheduler lease not released", error=safe_error(exc))
