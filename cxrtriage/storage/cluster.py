"""Nodes sharing one database: heartbeats, and leases that make one of them the leader.

PostgreSQL is the only coordination service (issue #14): each node upserts
its ``nodes`` row every few seconds, and periodic work (escalation, retries,
purge) runs only in the process holding the ``scheduler`` lease. A lease is
taken or renewed by one conditional UPDATE (held by me, or expired), or
created by an INSERT that does nothing when another process created it
first, so two processes can never both hold it: on PostgreSQL the UPDATE
locks the row, on SQLite every write transaction is serialised
(``BEGIN IMMEDIATE``, storage/db.py).

Times are each node's UTC clock: keep the nodes' clocks in sync (NTP), and
leases much longer than the clock skew.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from .db import rowcount, upsert_insert
from .models import Lease, NodeRecord, as_utc, utcnow

#: The lease of the node that runs the periodic jobs.
SCHEDULER_LEASE = "scheduler"
#: Each node beats this often (stages/housekeeping.py); one not seen for three beats is taken for gone.
HEARTBEAT_SECONDS = 10.0
LIVE_SECONDS = 3 * HEARTBEAT_SECONDS


def heartbeat(session: Session, *, name: str, incarnation: str, roles: Sequence[str], version: str,
              models: Mapping[str, str], started_at: dt.datetime, now: dt.datetime | None = None) -> None:
    """Record that the node ``name`` (this ``incarnation`` of it) is alive."""
    values = {"incarnation": incarnation, "roles": ",".join(roles), "version": version,
              "models": json.dumps(dict(models), sort_keys=True), "started_at": started_at,
              "last_seen": now or utcnow()}
    insert = upsert_insert(session.get_bind(), NodeRecord).values(name=name, **values)
    session.execute(insert.on_conflict_do_update(index_elements=[NodeRecord.name], set_=values))


def live_nodes(session: Session, within_seconds: float, now: dt.datetime | None = None) -> list[NodeRecord]:
    """Nodes seen in the last ``within_seconds``, by name."""
    since = (now or utcnow()) - dt.timedelta(seconds=within_seconds)
    return list(session.scalars(select(NodeRecord).where(NodeRecord.last_seen >= since).order_by(NodeRecord.name)))


def acquire(session: Session, name: str, holder: str, seconds: float, now: dt.datetime | None = None) -> bool:
    """Take or renew the lease ``name`` for ``holder`` until ``seconds`` from now; False when another
    holder's lease has not expired."""
    now = now or utcnow()
    until = now + dt.timedelta(seconds=seconds)
    renewed = session.execute(
        update(Lease).where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at < now))
        .values(holder=holder, expires_at=until)
    )
    if rowcount(renewed) == 1:
        return True
    created = session.execute(upsert_insert(session.get_bind(), Lease.__table__)
                              .values(name=name, holder=holder, acquired_at=now, expires_at=until)
                              .on_conflict_do_nothing().returning(Lease.name))
    return created.first() is not None


def release(session: Session, name: str, holder: str) -> None:
    """Give the lease up at once (a clean stop), if ``holder`` holds it."""
    session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))


def holder_of(session: Session, name: str, now: dt.datetime | None = None) -> str | None:
    """Who holds the lease now, or None when nobody does."""
    lease = session.get(Lease, name)
    return lease.holder if lease is not None and as_utc(lease.expires_at) > (now or utcnow()) else None
