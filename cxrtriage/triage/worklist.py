"""The reading worklist: every study the node holds, in priority order, and its reading state.

Built from the database each time it is asked for (studies, their images'
scoring results, and the readers' claims), so it is always current and
survives restarts. Claims are atomic: a conditional UPDATE succeeds for one
reader only.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import or_, select, update

from ..storage.db import Database, upsert_insert
from ..storage.models import Instance, Reading, ScoreResult, utcnow
from ..inference.identity import RESEARCH_USE_NOTICE
from ..inference.result_model import ImageResult
from ..config import PrioritySettings
from .priority import REQUESTED_PRIORITY_RANK, ImageFinding, StudyPriority, prioritise, rank



@dataclass
class WorklistEntry:
    study_instance_uid: str
    accession_number: str
    patient_id: str
    study_date: str
    study_description: str
    modalities: list[str]
    received_at: dt.datetime
    images: int
    priority: StudyPriority
    reading_state: str
    reader: str
    requested_priority: str
    total_score: int | None = None
    brixia_total: int | None = None
    p_disease: float | None = None
    zone_binary: list[int | None] = field(default_factory=list)
    zone_brixia: list[int | None] = field(default_factory=list)
    zones_scored: int | None = None
    missing_lungs: list[str] = field(default_factory=list)
    worst_sop_instance_uid: str | None = None
    research_use: bool = False
    models: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        p = self.priority
        return {
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "patient_id": self.patient_id,
            "study_date": self.study_date,
            "study_description": self.study_description,
            "modalities": self.modalities,
            "received_at": self.received_at.isoformat(),
            "waited_minutes": round(p.waited_minutes, 1),
            "images": self.images,
            "band": p.band,
            "priority": round(p.priority, 2),
            "flags": p.flags,
            "requested_priority": self.requested_priority,
            "reading_state": self.reading_state,
            "reader": self.reader,
            "total_score": self.total_score,
            "brixia_total": self.brixia_total,
            "p_disease": self.p_disease,
            "zone_binary": self.zone_binary,
            "zone_brixia": self.zone_brixia,
            "zones_scored": self.zones_scored,
            "missing_lungs": self.missing_lungs,
            "worst_sop_instance_uid": self.worst_sop_instance_uid,
            "research_use": self.research_use,
            "research_use_notice": RESEARCH_USE_NOTICE if self.research_use else "",
            "models": self.models,
        }


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


class Worklist:
    def __init__(self, db: Database, settings: PrioritySettings | None = None) -> None:
        self.db = db
        self.settings = settings or PrioritySettings()

    def entries(
        self, now: dt.datetime | None = None, *, band: str | None = None, modality: str | None = None,
        unread_only: bool = False, include_read: bool = False, study: str | None = None,
    ) -> list[WorklistEntry]:
        """Studies in reading order. Read studies are left out unless ``include_read``;
        ``study`` restricts the list to one Study Instance UID."""
        now = now or utcnow()
        images_query = select(Instance).where(Instance.kind == "source", Instance.duplicate_of_id.is_(None))
        results_query, readings_query = select(ScoreResult), select(Reading)
        if study is not None:
            images_query = images_query.where(Instance.study_instance_uid == study)
            results_query = results_query.where(ScoreResult.study_instance_uid == study)
            readings_query = readings_query.where(Reading.study_instance_uid == study)
        with self.db.session() as session:
            images = session.scalars(images_query).all()
            results = {r.instance_id: r for r in session.scalars(results_query).all()}
            readings = {r.study_instance_uid: r for r in session.scalars(readings_query).all()}
        studies: dict[str, list[Instance]] = {}
        for image in images:
            studies.setdefault(image.study_instance_uid, []).append(image)
        entries = []
        for uid, members in studies.items():
            reading = readings.get(uid)
            state = reading.state if reading else "unread"
            if state == "read" and not include_read:
                continue
            if unread_only and state != "unread":
                continue
            entry = self._entry(uid, members, results, reading, now)
            if band and entry.priority.band != band:
                continue
            if modality and modality.upper() not in entry.modalities:
                continue
            entries.append(entry)
        order = rank([(e.priority, e.received_at) for e in entries])
        return [entries[i] for i in order]

    def _entry(self, uid: str, members: list[Instance], results: dict[int, ScoreResult], reading: Reading | None,
               now: dt.datetime) -> WorklistEntry:
        findings = []
        details: dict[int, ImageResult] = {}
        for image in members:
            result = results.get(image.id)
            if result is None:
                findings.append(ImageFinding("pending"))
                continue
            if result.status == "scored":
                details[image.id] = ImageResult.model_validate_json(result.details or "{}")
            unscored = details[image.id].unscored_zones if image.id in details else 0
            findings.append(ImageFinding(result.status, result.total_score, result.brixia_total, result.p_disease,
                                         unscored_zones=unscored))
        received = min(_aware(m.received_at) for m in members)
        requested = [m.requested_priority for m in members]
        priority = prioritise(findings, requested, received, now, self.settings,
                              dimse_high=any(m.dimse_priority == 1 for m in members))
        if reading is not None and reading.escalated_at is not None:
            priority.flags.append("escalated")
        first = members[0]
        entry = WorklistEntry(
            study_instance_uid=uid, accession_number=first.accession_number, patient_id=first.patient_id,
            study_date=first.study_date, study_description=first.study_description,
            modalities=sorted({m.modality for m in members if m.modality}), received_at=received,
            images=len(members), priority=priority, reading_state=reading.state if reading else "unread",
            reader=reading.reader if reading else "",
            requested_priority=max(requested, key=lambda r: REQUESTED_PRIORITY_RANK.get(r.upper(), -1), default=""),
        )
        scored = [(finding, results[m.id], m) for finding, m in zip(findings, members) if m.id in details]
        if scored:
            _, worst, image = max(scored, key=lambda t: (t[0].ranking_total(self.settings), t[1].brixia_total or 0,
                                                         t[1].p_disease or 0.0))
            record = details[image.id]
            entry.total_score, entry.brixia_total, entry.p_disease = worst.total_score, worst.brixia_total, worst.p_disease
            entry.zone_binary = record.zone_values("binary_score")
            entry.zone_brixia = record.zone_values("brixia_grade")
            entry.zones_scored, entry.missing_lungs = record.zones_scored, list(record.missing_lungs)
            entry.worst_sop_instance_uid = image.sop_instance_uid
            entry.research_use = any(d.research_use for d in details.values())
            entry.models = sorted({m.name for d in details.values() if d.model_identity
                                   for m in (d.model_identity.lungs, d.model_identity.disease)})
        return entry

    def study(self, uid: str) -> dict[str, Any] | None:
        """Everything about one study: its worklist entry and each image's result."""
        matches = self.entries(include_read=True, study=uid)
        if not matches:
            return None
        with self.db.session() as session:
            rows = session.execute(
                select(Instance, ScoreResult).outerjoin(ScoreResult, ScoreResult.instance_id == Instance.id)
                .where(Instance.study_instance_uid == uid, Instance.kind == "source")
            ).all()
        images = []
        for image, result in rows:
            images.append({
                "sop_instance_uid": image.sop_instance_uid,
                "view_position": image.view_position,
                "status": result.status if result else "pending",
                "reason": result.reason if result else "",
                "message": result.message if result else "",
                "scores": json.loads(result.details) if result and result.details else None,
            })
        return {**matches[0].as_dict(), "image_results": images}

    # -- reading state ---------------------------------------------------

    def _ensure(self, session: Any, uid: str) -> None:
        session.execute(upsert_insert(self.db.engine, Reading).values(study_instance_uid=uid, state="unread", reader="",
                                               updated_at=utcnow()).on_conflict_do_nothing())

    def _transition(self, uid: str, allowed_from: Any, **values: Any) -> bool:
        with self.db.session() as session:
            exists = session.scalar(select(Instance.id).where(Instance.study_instance_uid == uid).limit(1))
            if exists is None:
                raise KeyError(uid)
            self._ensure(session, uid)
            done = session.execute(
                update(Reading).where(Reading.study_instance_uid == uid, allowed_from).values(updated_at=utcnow(), **values)
            )
            return done.rowcount == 1

    def claim(self, uid: str, reader: str) -> bool:
        """Claim for ``reader``; False when another reader holds it or it was read."""
        return self._transition(
            uid, or_(Reading.state == "unread", (Reading.state == "claimed") & (Reading.reader == reader)),
            state="claimed", reader=reader, claimed_at=utcnow(),
        )

    def unclaim(self, uid: str, reader: str) -> bool:
        return self._transition(uid, (Reading.state == "claimed") & (Reading.reader == reader),
                                state="unread", reader="", claimed_at=None)

    def mark_escalated(self, uid: str) -> bool:
        """Record an escalation; False when the study was escalated before (it fires once)."""
        return self._transition(uid, Reading.escalated_at.is_(None), escalated_at=utcnow())

    def mark_read(self, uid: str, reader: str) -> bool:
        """Mark read; allowed for the reader who claimed it, or on an unclaimed study."""
        return self._transition(
            uid, or_(Reading.state == "unread", (Reading.state == "claimed") & (Reading.reader == reader)),
            state="read", reader=reader, read_at=utcnow(),
        )
