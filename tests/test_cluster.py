"""Nodes sharing one database: heartbeats and the scheduler's leader lease (storage/cluster.py)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from cxrtriage.config import Settings
from cxrtriage.storage.cluster import LIVE_SECONDS, SCHEDULER_LEASE, acquire, heartbeat, holder_of, live_nodes, release
from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Reading
from cxrtriage.triage import jobs

from .harness import overdue_critical_studies

T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def db(database: Database) -> Database:
    return database  # conftest's migrated database, by a short name


def take(db: Database, holder: str, now: dt.datetime, seconds: float = 90) -> bool:
    with db.session() as session:
        return acquire(session, SCHEDULER_LEASE, holder, seconds, now)


def test_one_holder_at_a_time_until_its_lease_expires(db: Database) -> None:
    assert take(db, "a", T0)
    assert not take(db, "b", T0 + dt.timedelta(seconds=30))
    assert take(db, "a", T0 + dt.timedelta(seconds=60))  # renewed: now held until 150 s
    assert not take(db, "b", T0 + dt.timedelta(seconds=140))
    assert take(db, "b", T0 + dt.timedelta(seconds=151))  # a stopped renewing: b takes over
    assert not take(db, "a", T0 + dt.timedelta(seconds=160))
    with db.session() as session:
        assert holder_of(session, SCHEDULER_LEASE, T0 + dt.timedelta(seconds=160)) == "b"
        release(session, SCHEDULER_LEASE, "a")  # not a's to give up: nothing changes
        assert holder_of(session, SCHEDULER_LEASE, T0 + dt.timedelta(seconds=160)) == "b"
        release(session, SCHEDULER_LEASE, "b")
        assert holder_of(session, SCHEDULER_LEASE, T0 + dt.timedelta(seconds=160)) is None
    assert take(db, "a", T0 + dt.timedelta(seconds=161))  # a clean stop hands over at once


def test_many_processes_asking_at_once_get_one_leader(db: Database) -> None:
    for round_ in range(3):
        now = T0 + dt.timedelta(hours=round_)  # every earlier lease has expired
        barrier, won = threading.Barrier(6), []

        def ask(holder: str, barrier: threading.Barrier, now: dt.datetime, won: list[str]) -> None:
            barrier.wait(timeout=10)
            if take(db, holder, now):
                won.append(holder)

        threads = [threading.Thread(target=ask, args=(f"node-{i}:{round_}", barrier, now, won)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(won) == 1, won


def test_heartbeats_list_the_live_nodes(db: Database) -> None:
    with db.session() as session:
        for name, seen in (("receiver-1", T0), ("scorer-1", T0 - dt.timedelta(seconds=5)),
                           ("gone", T0 - dt.timedelta(minutes=10))):
            heartbeat(session, name=name, incarnation=f"{name}:1", roles=["receiver"], version="0.1.0",
                      models={}, started_at=T0 - dt.timedelta(hours=1), now=seen)
        heartbeat(session, name="scorer-1", incarnation="scorer-1:2", roles=["scorer", "sender"], version="0.1.0",
                  models={"lungs": "v2"}, started_at=T0, now=T0)  # restarted: same row, new incarnation
    with db.session() as session:
        live = live_nodes(session, 60, T0)
        assert [(n.name, n.incarnation, n.roles) for n in live] == [
            ("receiver-1", "receiver-1:1", "receiver"), ("scorer-1", "scorer-1:2", "scorer,sender")]


def test_every_node_lists_the_live_nodes_in_its_metrics(db: Database, tmp_path: Path) -> None:
    from cxrtriage.observability import Metrics
    from cxrtriage.stages.housekeeping import Housekeeping
    from cxrtriage.storage.archive import Archive
    from cxrtriage.storage.queue import JobQueue

    def node(name: str, roles: list[str]) -> Housekeeping:
        return Housekeeping(db, JobQueue(db), Metrics(), Archive(tmp_path / "archive"), name=name,
                            incarnation=f"{name}:1", roles=roles, models={})

    def listed(keeper: Housekeeping) -> dict[str, tuple[str, float]]:
        series = keeper.metrics.live_nodes.collect()[0].samples
        return {s.labels["node"]: (s.labels["roles"], s.value) for s in series}

    receiver, scorer = node("receiver-1", ["receiver"]), node("scorer-1", ["scorer", "sender"])
    receiver.beat(now=T0)
    scorer.beat(now=T0 + dt.timedelta(seconds=1))
    assert listed(scorer) == {"receiver-1": ("receiver", T0.timestamp()),
                              "scorer-1": ("scorer,sender", T0.timestamp() + 1)}
    scorer.beat(now=T0 + dt.timedelta(seconds=1 + LIVE_SECONDS))  # the receiver went silent
    assert list(listed(scorer)) == ["scorer-1"]


def test_only_the_leader_runs_the_periodic_jobs(db: Database, database_url: str, tmp_path: Path) -> None:
    """Three nodes' scheduler jobs on one database: one escalation per study, by the lease's holder."""
    overdue_critical_studies(db, 0, 3)
    settings = Settings.model_validate({"storage": {"database_url": database_url,
                                                    "archive_dir": str(tmp_path / "archive")}})
    fired = []
    try:
        for holder in ("node-a:1", "node-b:1", "node-c:1", "node-a:1"):
            jobs.use_settings(settings, holder)
            fired.append(jobs.escalate_overdue())
    finally:
        jobs.use_settings(settings)
    assert fired == [3, 0, 0, 0]  # a leads; b and c skip; a's next run finds each study escalated
    with db.session() as session:
        assert len(session.scalars(select(Reading).where(Reading.escalated_at.is_not(None))).all()) == 3
        assert holder_of(session, SCHEDULER_LEASE) == "node-a:1"


def test_the_models_match_the_migrations(db: Database) -> None:
    """Every table and column of storage/models.py is what the Alembic migrations create."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from cxrtriage.storage.models import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diff if d[0] != "remove_table" or d[1].name != "apscheduler_jobs"] == []
