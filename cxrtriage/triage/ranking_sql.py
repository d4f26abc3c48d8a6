"""The priority model of :mod:`cxrtriage.triage.priority` as one SQL query: the top N studies.

The worklist page asks for the first 200 studies every 2 s. Ranking every
unread study in Python costs a read of every image row; here the database
reads one row per study (``study_ranks``, kept current by the writers:
:mod:`~cxrtriage.triage.study_rank`), derives the band, base and aging, and
returns only the Study Instance UIDs of the first N in reading order, so that
only those are read in full.

It must agree with :func:`~cxrtriage.triage.priority.prioritise` and
:func:`~cxrtriage.triage.priority.worst_image` exactly (a test compares
both on random studies); the settings go in as bound values, so a changed
config.yaml ranks the next request differently: the stored rows hold no
setting (the worst image is kept for both values of
``missing_lung_zones_affected``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, Float, Integer, Select, and_, case, cast, func, literal, or_, select
from sqlalchemy.engine import Dialect

from ..config import BANDS, PrioritySettings
from ..storage.models import Instance, Reading, StudyRank
from .priority import BRIXIA_MAX, SEVERITY_WEIGHTS, TOP
from .study_rank import SEP


def _larger(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    """max(a, b) on both SQLite and PostgreSQL (their two-argument max differs in name)."""
    return case((a >= b, a), else_=b)


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
    """Study Instance UIDs of the first ``limit`` studies in reading order (priority, then arrival).

    Reads one ``study_ranks`` row per study (:mod:`~cxrtriage.triage.study_rank`) and its reading state.
    """
    r = StudyRank
    key = r.worst_key if settings.missing_lung_zones_affected else r.worst_key_plain
    # The worst image's (ranking total, Brixia-style total, P(disease)), unpacked (study_rank.worst_key).
    total = _floor(dialect, key / 1000.0)
    brixia_doubled = _floor(dialect, (key - total * 1000.0) / 2.0) * 2.0
    raised = sorted(((float(v), name) for name, v in settings.order_base.items() if v > 0), reverse=True)
    order_requested = case(*((r.requested.like(f"%{SEP}{name}{SEP}%"), literal(v))
                             for v, name in raised), else_=literal(0.0)) if raised else literal(0.0)
    order_dimse = case((r.dimse_high == 1, literal(float(settings.order_base.get("HIGH", 0.0)))),
                       else_=literal(0.0))
    studies = select(
        r.study_instance_uid.label("uid"), r.received_at.label("received"), r.pending.label("pending"),
        case((key.is_(None), 0), else_=1).label("scored"), total.label("total"),
        (brixia_doubled / 2.0).label("brixia"), (key - total * 1000.0 - brixia_doubled).label("p"),
        _larger(order_requested, order_dimse).label("order_base"),
    ).select_from(r.__table__.outerjoin(Reading.__table__, Reading.study_instance_uid == r.study_instance_uid))
    if modality:
        studies = studies.where(r.modalities.like(f"%{SEP}{modality.strip().upper()}{SEP}%"))
    if unread_only:
        studies = studies.where(or_(Reading.state.is_(None), Reading.state == "unread"))
    elif not include_read:
        studies = studies.where(or_(Reading.state.is_(None), Reading.state != "read"))
    s = studies.subquery("studies")

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
        s.c.uid, s.c.received, band_of.label("band"), severity.label("severity"), s.c.order_base,
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
