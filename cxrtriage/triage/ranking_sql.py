"""The priority model of :mod:`cxrtriage.triage.priority` as one SQL query: the top N studies.

The worklist page asks for the first 200 studies every 2 s. Ranking every
unread study in Python costs a read of every image row; here the database
picks the worst image of each study (a window function), derives the band,
base and aging, and returns only the Study Instance UIDs of the first N in
reading order, so that only those are read in full.

It must agree with :func:`~cxrtriage.triage.priority.prioritise` and
:func:`~cxrtriage.triage.priority.worst_image` exactly (a test compares
both on random studies); the settings go in as bound values, so a changed
config.yaml ranks the next request differently, with nothing stored to
recompute.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, Float, Integer, Select, and_, case, cast, func, literal, null, or_, select
from sqlalchemy.engine import Dialect

from ..config import BANDS, PrioritySettings
from ..inference.scoring import ZONE_NAMES
from ..storage.models import Instance, Reading, ResultStatus, ScoreResult
from .priority import BRIXIA_MAX, SEVERITY_WEIGHTS, TOP

ZONES = len(ZONE_NAMES)


def _larger(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    """max(a, b) on both SQLite and PostgreSQL (their two-argument max differs in name)."""
    return case((a >= b, a), else_=b)


def _smaller(dialect: Dialect, a: ColumnElement[Any], b: Any) -> ColumnElement[Any]:
    """min(a, b) as one function call (SQLite's two-argument min, PostgreSQL's LEAST)."""
    return func.min(a, b) if dialect.name == "sqlite" else func.least(a, b)


def _floor(dialect: Dialect, value: ColumnElement[Any]) -> ColumnElement[Any]:
    """floor() of a non-negative number (SQLite's floor() needs its optional math functions)."""
    return cast(value, Integer) if dialect.name == "sqlite" else func.floor(value)


def _per_band(band: ColumnElement[Any], values: dict[str, float]) -> ColumnElement[Any]:
    return case(*((band == name, literal(float(values[name]))) for name in BANDS), else_=literal(0.0))


def minutes_since(dialect: Dialect, column: ColumnElement[Any], now: dt.datetime) -> ColumnElement[Any]:
    """Minutes from a stored time to ``now``, computed by the database."""
    now = now.astimezone(dt.UTC)
    if dialect.name == "sqlite":  # SQLite keeps times as naive UTC text
        text = now.replace(tzinfo=None).isoformat(sep=" ")
        return (func.julianday(text) - func.julianday(column)) * 1440.0
    return func.extract("epoch", literal(now, type_=Instance.received_at.type) - column) / 60.0


def top_studies(
    dialect: Dialect, settings: PrioritySettings, now: dt.datetime, limit: int, *, band: str | None = None,
    modality: str | None = None, unread_only: bool = False, include_read: bool = False,
) -> Select[tuple[str]]:
    """Study Instance UIDs of the first ``limit`` studies in reading order (priority, then arrival)."""
    # Per-image expressions are most of the query's cost on SQLite: each is written to be evaluated once.
    scored = ScoreResult.status == ResultStatus.SCORED.value  # NULL (no result yet) is not scored
    raw_total: ColumnElement[Any] = func.coalesce(ScoreResult.total_score, 0)
    if settings.missing_lung_zones_affected:  # zones of a lung not found count as affected
        raw_total = raw_total + (ZONES - func.coalesce(ScoreResult.zones_scored, ZONES))
    ranking_total = _smaller(dialect, raw_total, ZONES)
    brixia, p = func.coalesce(ScoreResult.brixia_total, 0), func.coalesce(ScoreResult.p_disease, 0.0)
    raised = {name: float(v) for name, v in settings.order_base.items() if v}
    order_requested = (case(raised, value=func.upper(func.trim(Instance.requested_priority)), else_=literal(0.0))
                       if raised else literal(0.0))
    # The worst image's (ranking total, Brixia-style total, P(disease)) packed into one number whose
    # maximum is the lexicographic maximum (P < 1 < 2 brixia steps < 1000 total steps), so a plain
    # GROUP BY finds each study's worst image: a window function costs several times more on SQLite.
    worst_key = case((scored, ranking_total * 1000.0 + brixia * 2.0 + p), else_=null())
    images = (
        select(
            Instance.study_instance_uid.label("uid"), Instance.received_at.label("received"),
            Instance.modality.label("modality"),
            case((ScoreResult.status.is_(None), 1), else_=0).label("pending"), worst_key.label("worst_key"),
            order_requested.label("order_requested"),
            case((Instance.dimse_priority == 1, literal(float(settings.order_base.get("HIGH", 0.0)))),
                 else_=literal(0.0)).label("order_dimse"),
        )
        .select_from(Instance)
        .outerjoin(ScoreResult, ScoreResult.instance_id == Instance.id)
        .where(Instance.kind == "source", Instance.duplicate_of_id.is_(None))
    )
    i = images.subquery("images")
    study_columns: list[Any] = [
        i.c.uid,
        func.min(i.c.received).label("received"),
        func.max(i.c.order_requested).label("order_requested"),
        func.max(i.c.order_dimse).label("order_dimse"),
        func.max(i.c.pending).label("pending"),
        func.max(i.c.worst_key).label("worst_key"),
    ]
    studies = select(*study_columns).group_by(i.c.uid)
    if modality:
        studies = studies.having(func.max(case((func.upper(i.c.modality) == modality.upper(), 1), else_=0)) == 1)
    packed = studies.subquery("packed")
    total = _floor(dialect, packed.c.worst_key / 1000.0)
    brixia_doubled = _floor(dialect, (packed.c.worst_key - total * 1000.0) / 2.0) * 2.0
    unpacked = select(
        packed.c.uid, packed.c.received, packed.c.order_requested, packed.c.order_dimse, packed.c.pending,
        case((packed.c.worst_key.is_(None), 0), else_=1).label("scored"),
        total.label("total"), (brixia_doubled / 2.0).label("brixia"),
        (packed.c.worst_key - total * 1000.0 - brixia_doubled).label("p"),
    ).select_from(packed.outerjoin(Reading, Reading.study_instance_uid == packed.c.uid))  # per study, not image
    if unread_only:
        unpacked = unpacked.where(or_(Reading.state.is_(None), Reading.state == "unread"))
    elif not include_read:
        unpacked = unpacked.where(or_(Reading.state.is_(None), Reading.state != "read"))
    s = unpacked.subquery("studies")

    total, p_worst = func.coalesce(s.c.total, 0), func.coalesce(s.c.p, 0.0)
    band_of = case(
        (and_(s.c.scored == 1, total >= settings.critical_total), literal("critical")),
        (and_(s.c.scored == 1, total >= settings.high_total), literal("high")),
        (and_(s.c.scored == 1, or_(total >= settings.moderate_total, p_worst >= settings.moderate_p_disease)),
         literal("moderate")),
        (s.c.scored == 1, literal("low")),
        (s.c.pending == 1, literal("unscored")),
        else_=literal("ai_failed"),
    )
    brixia_capped = case((func.coalesce(s.c.brixia, 0) > BRIXIA_MAX, BRIXIA_MAX), else_=func.coalesce(s.c.brixia, 0))
    w_total, w_brixia, w_p = SEVERITY_WEIGHTS
    severity = case((s.c.scored == 1, w_total * total + w_brixia * brixia_capped + w_p * p_worst),
                    else_=literal(0.0))
    banded = select(
        s.c.uid, s.c.received, band_of.label("band"), severity.label("severity"),
        _larger(s.c.order_requested, s.c.order_dimse).label("order_base"),
    ).subquery("banded")

    base = _larger(_per_band(banded.c.band, settings.base) + banded.c.severity, banded.c.order_base)
    max_wait = _per_band(banded.c.band, settings.max_wait_minutes)
    waited = minutes_since(dialect, banded.c.received, now)
    waited = case((waited > 0, cast(waited, Float)), else_=literal(0.0))
    priority = case(
        (waited <= max_wait, base + (TOP - base) * waited / max_wait),
        else_=TOP + (waited - max_wait) / max_wait,
    )
    query = select(banded.c.uid).order_by(priority.desc(), banded.c.received, banded.c.uid).limit(limit)
    if band:
        query = query.where(banded.c.band == band)
    return query
