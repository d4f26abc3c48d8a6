"""Readiness: can this node take studies and serve the worklist right now?

A load balancer or orchestrator sends work only to a ready node and restarts
a node that stops answering at all, so there are two probes:

* ``/api/health/live`` answers 200 while the process serves HTTP (liveness).
* ``/api/health`` answers 200 ``{"status": "ready"}`` or 503 ``{"status": "not_ready",
  "reasons": [...]}`` (readiness): the models are loaded, the database answers
  ``SELECT 1`` within a short timeout, and the archive has more free space than
  ``storage.min_free_mb`` (below it C-STORE is refused with 0xA700 anyway).

Each destination's backlog (send jobs pending or running) and circuit state are
reported too, but an open circuit does not make the node unready: results wait
in the outbox and nothing is lost (stages/circuit.py). Both probes are open
without the token, so they carry no patient data: counts and names of
destinations only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select, text

from ..storage.archive import Archive
from ..storage.db import Database
from ..storage.models import Job, JobKind, JobState

MIB = 1024 * 1024
#: How long the readiness probe waits for the database before calling it unreachable.
DB_TIMEOUT_S = 2.0


class DestinationHealth(BaseModel):
    """One destination's send backlog and circuit."""

    destination: str
    backlog: int = Field(description="send jobs pending or running for this destination")
    circuit: str = Field(description="closed (sending), open (backing off) or half_open (one trial)")


class Readiness(BaseModel):
    """The readiness probe's answer (``/api/health``): 200 when ready, 503 with the reasons when not."""

    status: Literal["ready", "not_ready"]
    reasons: list[str] = Field(default_factory=list, description="why the node is not ready; empty when ready")
    models_loaded: bool
    database: bool = Field(description="the database answered SELECT 1 within the timeout")
    free_mb: int | None = Field(description="free space of the archive's filesystem; null when unknown")
    min_free_mb: int = Field(description="storage.min_free_mb: below it the node refuses C-STORE")
    destinations: list[DestinationHealth] = Field(default_factory=list)


class Liveness(BaseModel):
    """The liveness probe's answer: the process serves HTTP."""

    status: Literal["alive"] = "alive"


def _within(seconds: float, probe: Callable[[], object]) -> bool:
    """Whether ``probe`` returns without raising within ``seconds`` (a hung connection counts as down)."""
    outcome: list[bool] = []

    def run() -> None:
        try:
            probe()
            outcome.append(True)
        except Exception:  # any driver error means unreachable; the probe says so, not why
            outcome.append(False)

    worker = threading.Thread(target=run, name="readiness-db", daemon=True)
    worker.start()
    worker.join(seconds)
    return bool(outcome and outcome[0])


def database_answers(db: Database, timeout_s: float = DB_TIMEOUT_S) -> bool:
    """``SELECT 1`` on a pooled connection, given ``timeout_s`` to answer."""

    def select_one() -> None:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    return _within(timeout_s, select_one)


def send_backlog(db: Database) -> dict[str, int]:
    """Send jobs pending or running, per destination."""
    with db.session() as session:
        rows = session.execute(
            select(Job.destination, func.count()).where(
                Job.kind == JobKind.SEND.value, Job.state.in_([JobState.PENDING.value, JobState.RUNNING.value]))
            .group_by(Job.destination)
        ).all()
    return {destination: int(count) for destination, count in rows}


def readiness(db: Database, archive: Archive, min_free_bytes: int, *,
              circuits: Callable[[], list[dict[str, object]]] | None = None,
              models_ready: Callable[[], bool] | None = None) -> Readiness:
    """Compute readiness now (see the module docstring); ``circuits`` is the node's ``circuits.states``."""
    reasons: list[str] = []
    models = models_ready() if models_ready is not None else True
    if not models:
        reasons.append("models not loaded")
    database = database_answers(db)
    if not database:
        reasons.append("database unreachable")
    try:
        free: int | None = archive.free_bytes()
    except OSError:
        free = None
    if free is None:
        reasons.append("archive not readable")
    elif free < min_free_bytes:
        reasons.append(f"archive below storage.min_free_mb ({free // MIB} MB free)")
    backlog = send_backlog(db) if database else {}
    states = {str(c["destination"]): str(c["state"]) for c in (circuits() if circuits else [])}
    destinations = [DestinationHealth(destination=d, backlog=backlog.get(d, 0), circuit=states.get(d, "closed"))
                    for d in sorted(set(states) | set(backlog))]
    return Readiness(status="not_ready" if reasons else "ready", reasons=reasons, models_loaded=models,
                     database=database, free_mb=None if free is None else free // MIB,
                     min_free_mb=min_free_bytes // MIB, destinations=destinations)
