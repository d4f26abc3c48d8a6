"""The live nodes sharing this node's database, for the web page's node list and ``/api/nodes``.

Read from the heartbeats (``nodes``, storage/cluster.py): a node not seen for
:data:`~cxrtriage.storage.cluster.LIVE_SECONDS` is left out. The node holding
the scheduler lease is marked as the one running escalation, retries and purge.
"""

from __future__ import annotations

import datetime as dt
import json

from pydantic import BaseModel, Field

from ..storage.cluster import LIVE_SECONDS, SCHEDULER_LEASE, holder_of, live_nodes
from ..storage.db import Database
from ..storage.models import as_utc, utcnow


class NodeState(BaseModel):
    """One live node: what it runs and when it was last heard from (no patient data)."""

    name: str = Field(description="the node's node_name")
    roles: list[str] = Field(description="the roles it serves: receiver, scorer, sender, scheduler, web")
    version: str = Field(description="its cxrtriage version")
    models: dict[str, str] = Field(description="what its scorers load (empty: it does not score)")
    started_at: dt.datetime
    last_seen: dt.datetime
    seconds_since_seen: float
    leader: bool = Field(description="it holds the scheduler lease: it runs escalation, retries and purge")


def node_states(db: Database, now: dt.datetime | None = None) -> list[NodeState]:
    """The live nodes, by name."""
    now = now or utcnow()
    with db.session() as session:
        leader = holder_of(session, SCHEDULER_LEASE, now)
        return [NodeState(name=node.name, roles=[r for r in node.roles.split(",") if r], version=node.version,
                          models=json.loads(node.models or "{}"), started_at=as_utc(node.started_at),
                          last_seen=as_utc(node.last_seen),
                          seconds_since_seen=round((now - as_utc(node.last_seen)).total_seconds(), 1),
                          leader=node.incarnation == leader)
                for node in live_nodes(session, LIVE_SECONDS, now)]
