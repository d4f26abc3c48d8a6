"""The ``study_ranks`` rows: one per study, what ranking needs, kept current by every writer.

The worklist page asks for its first 200 studies every 2 s. Grouping every
source image by study on each request cost 80 ms at 10 000 studies; instead,
each write that changes a study's ranking inputs recomputes that study's row
in its own transaction:

* ingest of an original source image (:mod:`cxrtriage.scp.ingest`),
* a result, of any status (:mod:`cxrtriage.stages.score`),
* a purge (:mod:`cxrtriage.triage.jobs`).

The row is recomputed from the study's images, never incremented, so a
refresh is idempotent and a missed one is repaired by the next. Two writers of
one study (two scorers finishing images of the same study) are serialised by a
per-study lock taken before the images are read: on PostgreSQL a
transaction-scoped advisory lock (READ COMMITTED then shows the second writer
the first one's committed result); SQLite serialises every write transaction
already (``BEGIN IMMEDIATE``, storage/db.py).

Reading state is not copied: ranking joins ``readings`` (one row per study).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, case, delete, func, insert, literal, null, select
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import InstrumentedAttribute, Session

from ..storage.models import Instance, ResultStatus, ScoreResult, StudyRank
from .priority import ZONES_PER_IMAGE

#: First key of the PostgreSQL advisory locks that serialise refreshes per study ("CXRS").
_LOCK_SPACE = 0x43585253
#: Separator of the lists in ``modalities`` and ``requested``: ",CR,DX," (matched with LIKE '%,CR,%').
SEP = ","


def smaller(dialect: Dialect, a: ColumnElement[Any], b: Any) -> ColumnElement[Any]:
    """min(a, b) as one function call (SQLite's two-argument min, PostgreSQL's LEAST)."""
    return func.min(a, b) if dialect.name == "sqlite" else func.least(a, b)


def _list_of(dialect: Dialect, column: ColumnElement[Any] | InstrumentedAttribute[str]) -> ColumnElement[Any]:
    """The distinct non-empty upper-case values of a text column as ",A,B,"; "," when there is none."""
    value = func.nullif(func.upper(func.trim(column)), "")
    joined = (func.group_concat(value.distinct()) if dialect.name == "sqlite"  # SQLite: DISTINCT, ',' only
              else func.string_agg(value.distinct(), literal(SEP)))
    return func.coalesce(literal(SEP).concat(joined).concat(literal(SEP)), literal(SEP))


def worst_key(dialect: Dialect, *, missing_lungs_affected: bool) -> ColumnElement[Any]:
    """An image's severity packed into one number whose maximum is the worst image of a study.

    (ranking zone total, Brixia-style total, P(disease)) compared lexicographically,
    as :func:`~cxrtriage.triage.priority.worst_image` does: P < 1 < 2 Brixia steps <
    1000 zone steps. NULL for an image without a ``scored`` result.
    """
    total: ColumnElement[Any] = func.coalesce(ScoreResult.total_score, 0)
    if missing_lungs_affected:  # zones of a lung that was not found count as affected
        total = total + (ZONES_PER_IMAGE - func.coalesce(ScoreResult.zones_scored, ZONES_PER_IMAGE))
    packed = (smaller(dialect, total, ZONES_PER_IMAGE) * 1000.0 + func.coalesce(ScoreResult.brixia_total, 0) * 2.0
              + func.coalesce(ScoreResult.p_disease, 0.0))
    return case((ScoreResult.status == ResultStatus.SCORED.value, packed), else_=null())


def _rows(dialect: Dialect) -> Select[tuple[Any, ...]]:
    """``study_ranks`` rows computed from the images (one per study), for INSERT ... SELECT."""
    return (
        select(
            Instance.study_instance_uid,
            func.min(Instance.received_at),
            _list_of(dialect, Instance.modality),
            _list_of(dialect, Instance.requested_priority),
            func.max(case((Instance.dimse_priority == 1, 1), else_=0)),
            func.max(case((ScoreResult.status.is_(None), 1), else_=0)),
            func.max(worst_key(dialect, missing_lungs_affected=True)),
            func.max(worst_key(dialect, missing_lungs_affected=False)),
        )
        .select_from(Instance)
        .outerjoin(ScoreResult, ScoreResult.instance_id == Instance.id)
        .where(Instance.kind == "source", Instance.duplicate_of_id.is_(None))
        .group_by(Instance.study_instance_uid)
    )


_COLUMNS = ("study_instance_uid", "received_at", "modalities", "requested", "dimse_high", "pending", "worst_key",
            "worst_key_plain")


def refresh_study(session: Session, study_instance_uid: str) -> None:
    """Recompute one study's row in the caller's transaction (no row when it has no source image left)."""
    dialect = session.get_bind().dialect
    if dialect.name != "sqlite":  # SQLite: the transaction holds the write lock already
        session.execute(sql_text("SELECT pg_advisory_xact_lock(:space, hashtext(:uid))"),
                        {"space": _LOCK_SPACE, "uid": study_instance_uid})
    session.execute(delete(StudyRank).where(StudyRank.study_instance_uid == study_instance_uid))
    rows = _rows(dialect).where(Instance.study_instance_uid == study_instance_uid)
    session.execute(insert(StudyRank).from_select(_COLUMNS, rows))


def rebuild(session: Session) -> int:
    """Recompute every row (after a bulk load or a restore of an older backup); returns the number of studies."""
    dialect = session.get_bind().dialect
    session.execute(delete(StudyRank))
    session.execute(insert(StudyRank).from_select(_COLUMNS, _rows(dialect)))
    return session.scalar(select(func.count()).select_from(StudyRank)) or 0
