"""The reading worklist: every study the node holds, in priority order, and its reading state.

Built from the database each time it is asked for, so it is always current and
survives restarts. One query reads what ranking needs: each source image's
result summary columns (total, Brixia-style total, P(disease), zones scored)
and its study's reading state; read studies are left out in SQL. The JSON
record of a result (:class:`~cxrtriage.inference.result_model.ImageResult`) is
parsed only for the studies returned, after ranking and ``limit``.

Claims are atomic: a conditional UPDATE succeeds for one reader only.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Select, or_, select, update
from sqlalchemy.orm import Session

from ..config import PrioritySettings
from ..inference.identity import RESEARCH_USE_NOTICE
from ..inference.result_model import ImageResult, unscored_zones
from ..inference.scoring import ZONE_NAMES
from ..storage.audit import AuditAction, record_audit
from ..storage.db import Database, rowcount, upsert_insert
from ..storage.models import Instance, Reading, ResultStatus, ScoreResult, as_utc, utcnow
from .priority import PENDING, REQUESTED_PRIORITY_RANK, ImageFinding, StudyPriority, prioritise, rank
from .ranking_sql import top_studies

#: Bound parameters per IN (...) list: well under SQLite's limit on host parameters.
CHUNK = 500
_ZONES_DESCRIPTION = f"zones {', '.join(ZONE_NAMES)}; null: unscored"


class StudyNotFound(LookupError):
    """No study with this Study Instance UID is held (the REST API answers 404)."""

    def __init__(self, uid: str) -> None:
        super().__init__(uid)
        self.uid = uid

    def __str__(self) -> str:
        return f"no such study: {self.uid}"


# -- what the API serves (the OpenAPI schema names every field) ------------


class WorklistRow(BaseModel):
    """One study of the worklist as the REST API serves it."""

    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str = Field("", description="DICOM PN, e.g. Doe^Jane (empty when web.show_patient_identity is off)")
    study_date: str
    study_description: str
    modalities: list[str]
    received_at: str = Field(description="arrival of the study's first image, ISO 8601")
    waited_minutes: float
    images: int = Field(description="source images (duplicates left out)")
    band: str = Field(description="critical, high, moderate, low, unscored or ai_failed")
    priority: float = Field(description="reading priority, higher first (docs/triage.md)")
    flags: list[str]
    requested_priority: str = Field(description="the most urgent Requested Procedure Priority (0040,1003)")
    reading_state: str = Field(description="unread, claimed or read")
    reader: str
    total_score: int | None = Field(None, description="0-6 zone score of the most severe image")
    brixia_total: int | None = Field(None, description="Brixia-style total (0-18) of the most severe image")
    p_disease: float | None = Field(None, description="P(disease) of the most severe image")
    zone_binary: list[int | None] = Field(default_factory=list, description=_ZONES_DESCRIPTION)
    zone_brixia: list[int | None] = Field(default_factory=list, description=_ZONES_DESCRIPTION)
    zones_scored: int | None = None
    missing_lungs: list[str] = Field(default_factory=list)
    worst_sop_instance_uid: str | None = Field(None, description="the most severe image, whose values are shown")
    research_use: bool = False
    research_use_notice: str = ""
    models: list[str] = Field(default_factory=list)


class ImageResultRow(BaseModel):
    """One source image of a study and its result."""

    sop_instance_uid: str
    view_position: str
    status: str = Field(description="scored, not_scorable, failed or pending")
    reason: str
    message: str
    scores: ImageResult | None = None


class StudyDetail(WorklistRow):
    """One study: its worklist row and each image's result."""

    image_results: list[ImageResultRow]


# -- what the database gives ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRow:
    """One source image with its result's summary columns: what ranking needs, no JSON."""

    instance_id: int
    modality: str
    received_at: dt.datetime
    requested_priority: str
    dimse_priority: int | None
    status: str  # scored | not_scorable | failed | pending (no result yet)
    total: int | None
    brixia: int | None
    p_disease: float | None
    zones_scored: int | None

    def finding(self) -> ImageFinding:
        # zones_scored 0 is "no lung found": six unscored zones, not a clear film
        unscored = unscored_zones(self.zones_scored) if self.status == ResultStatus.SCORED else 0
        return ImageFinding(self.status, self.total, self.brixia, self.p_disease, unscored_zones=unscored)


@dataclass(slots=True)
class StudyRows:
    """A study's source images (in arrival order) and its reading state."""

    uid: str
    state: str
    reader: str
    escalated: bool
    images: list[ImageRow] = field(default_factory=list)


@dataclass
class WorklistEntry:
    study_instance_uid: str
    modalities: list[str]
    received_at: dt.datetime
    images: int
    priority: StudyPriority
    reading_state: str
    reader: str
    requested_priority: str
    accession_number: str = ""  # the labels come from the study's first image, read for shown studies only
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_description: str = ""
    dimse_high: bool = False  # an image of the study came with DIMSE priority HIGH (0000,0700 = 1)
    ai_status: str = "PENDING"  # SCORED, PENDING, FAILED or NOT_SCORABLE (as C-FIND reports it)
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
    scored_instance_ids: list[int] = field(default_factory=list)
    worst_instance_id: int | None = None
    first_instance_id: int = 0

    def row(self) -> WorklistRow:
        p = self.priority
        return WorklistRow(
            study_instance_uid=self.study_instance_uid, accession_number=self.accession_number,
            patient_id=self.patient_id, patient_name=self.patient_name, study_date=self.study_date,
            study_description=self.study_description,
            modalities=self.modalities, received_at=self.received_at.isoformat(),
            waited_minutes=round(p.waited_minutes, 1), images=self.images, band=p.band,
            priority=round(p.priority, 2), flags=p.flags, requested_priority=self.requested_priority,
            reading_state=self.reading_state, reader=self.reader, total_score=self.total_score,
            brixia_total=self.brixia_total, p_disease=self.p_disease, zone_binary=self.zone_binary,
            zone_brixia=self.zone_brixia, zones_scored=self.zones_scored, missing_lungs=self.missing_lungs,
            worst_sop_instance_uid=self.worst_sop_instance_uid, research_use=self.research_use,
            research_use_notice=RESEARCH_USE_NOTICE if self.research_use else "", models=self.models,
        )

    def apply_details(self, details: dict[int, ImageResult]) -> None:
        """Fill what only the JSON records hold: zone grades, missing lungs, the models and research use."""
        records = [details[i] for i in self.scored_instance_ids if i in details]
        worst = details.get(self.worst_instance_id) if self.worst_instance_id is not None else None
        if worst is not None:
            self.zone_binary = worst.zone_values("binary_score")
            self.zone_brixia = worst.zone_values("brixia_grade")
            self.zones_scored, self.missing_lungs = worst.zones_scored, list(worst.missing_lungs)
        self.research_use = any(r.research_use for r in records)
        self.models = sorted({m.name for r in records if r.model_identity
                              for m in (r.model_identity.lungs, r.model_identity.disease)})


@functools.lru_cache(maxsize=8192)
def parse_record(text: str) -> ImageResult:
    """A result's JSON record, typed; parsed once per distinct record.

    The page asks for the same studies every 2 s, and a record never changes
    in place (a new result is a new text), so the parse is cached; the
    returned objects are shared and must not be modified.
    """
    return ImageResult.model_validate_json(text)


def chunks(values: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """``values`` in slices small enough for one SQL ``IN (...)``."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def ai_status(images: Sequence[ImageRow]) -> str:
    """The study's AI status as C-FIND reports it (0099,1004): SCORED, PENDING, FAILED or NOT_SCORABLE."""
    statuses = {image.status for image in images}
    if ResultStatus.SCORED in statuses:
        return "SCORED"
    if PENDING in statuses or not statuses:
        return "PENDING"
    return "FAILED" if ResultStatus.FAILED in statuses else "NOT_SCORABLE"


class Worklist:
    def __init__(self, db: Database, settings: PrioritySettings | None = None) -> None:
        self.db = db
        self.settings = settings or PrioritySettings()

    def entries(
        self, now: dt.datetime | None = None, *, band: str | None = None, modality: str | None = None,
        unread_only: bool = False, include_read: bool = False, study: str | None = None,
        studies: Collection[str] | None = None, limit: int | None = None, details: bool = True,
    ) -> list[WorklistEntry]:
        """Studies in reading order.

        Read studies are left out unless ``include_read``; ``study`` / ``studies``
        restrict the list to those Study Instance UIDs; ``limit`` keeps the first
        N in reading order (ranking still sees every study: the database ranks them,
        :mod:`~cxrtriage.triage.ranking_sql`, and only those N are read). ``details=False``
        skips the JSON records (zone grades, missing lungs, models, research use).
        """
        now = now or utcnow()
        wanted = [study] if study is not None else (sorted(set(studies)) if studies is not None else None)
        with self.db.session() as session:
            if limit is not None and wanted is None:  # the database ranks; only the first N are read in full
                wanted = list(session.scalars(top_studies(
                    self.db.engine.dialect, self.settings, now, limit, band=band, modality=modality,
                    unread_only=unread_only, include_read=include_read,
                )))
            found = self._studies(session, include_read=include_read, uids=wanted)
            entries = [self._entry(s, now) for s in found if not unread_only or s.state == "unread"]
            entries = [e for e in entries if (not band or e.priority.band == band)
                       and (not modality or modality.upper() in e.modalities)]
            entries = [entries[i] for i in rank([(e.priority, e.received_at) for e in entries])][:limit]
            self._label(session, entries)
            if details:
                records = self._details(session, [i for e in entries for i in e.scored_instance_ids])
                for entry in entries:
                    entry.apply_details(records)
        return entries

    # -- reading the database ---------------------------------------------

    def _image_query(self, include_read: bool) -> Select[*tuple[Any, ...]]:
        """Every non-duplicate source image, its result's summary columns and its study's reading state.

        Only what ranking needs: labels (accession, patient, UIDs) are read later for the shown studies.
        """
        query = (
            select(
                Instance.id, Instance.study_instance_uid, Instance.modality,
                Instance.received_at, Instance.requested_priority, Instance.dimse_priority,
                ScoreResult.status, ScoreResult.total_score, ScoreResult.brixia_total, ScoreResult.p_disease,
                ScoreResult.zones_scored,  # a summary column: ranking parses no JSON
                Reading.state, Reading.reader, Reading.escalated_at,
            )
            .select_from(Instance)
            .outerjoin(ScoreResult, ScoreResult.instance_id == Instance.id)
            .outerjoin(Reading, Reading.study_instance_uid == Instance.study_instance_uid)
            .where(Instance.kind == "source", Instance.duplicate_of_id.is_(None))
            .order_by(Instance.id)
        )
        if not include_read:
            query = query.where(or_(Reading.state.is_(None), Reading.state != "read"))
        return query

    def _studies(self, session: Session, *, include_read: bool, uids: list[str] | None) -> list[StudyRows]:
        query = self._image_query(include_read)
        if uids is None:
            return _group(session.execute(query))
        rows: list[Any] = []
        for chunk in chunks(uids):
            rows.extend(session.execute(query.where(Instance.study_instance_uid.in_(chunk))))
        return _group(sorted(rows, key=lambda r: r[0]))

    @staticmethod
    def _label(session: Session, entries: Sequence[WorklistEntry]) -> None:
        """Accession, patient and study labels (from each study's first image) and the worst image's SOP UID."""
        wanted = {e.first_instance_id for e in entries} | {e.worst_instance_id for e in entries if e.worst_instance_id}
        labels: dict[int, Any] = {}
        for chunk in chunks(sorted(wanted)):
            for row in session.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.accession_number, Instance.patient_id,
                       Instance.patient_name, Instance.study_date, Instance.study_description)
                .where(Instance.id.in_(chunk))
            ):
                labels[row[0]] = row
        for entry in entries:
            (_, _, entry.accession_number, entry.patient_id, entry.patient_name, entry.study_date,
             entry.study_description) = labels[entry.first_instance_id]
            if entry.worst_instance_id is not None:
                entry.worst_sop_instance_uid = labels[entry.worst_instance_id][1]

    @staticmethod
    def _details(session: Session, instance_ids: Sequence[int]) -> dict[int, ImageResult]:
        """The JSON records of these results, typed."""
        records: dict[int, ImageResult] = {}
        for chunk in chunks(list(instance_ids)):
            for instance_id, text in session.execute(
                select(ScoreResult.instance_id, ScoreResult.details).where(ScoreResult.instance_id.in_(chunk))
            ):
                records[instance_id] = parse_record(text or "{}")
        return records

    def _entry(self, study: StudyRows, now: dt.datetime) -> WorklistEntry:
        images = study.images
        requested = [image.requested_priority for image in images]
        received = min(image.received_at for image in images)
        dimse_high = any(image.dimse_priority == 1 for image in images)
        priority = prioritise([image.finding() for image in images], requested, received, now, self.settings,
                              dimse_high=dimse_high)
        if study.escalated:
            priority.flags.append("escalated")
        entry = WorklistEntry(
            study_instance_uid=study.uid, first_instance_id=images[0].instance_id,
            modalities=sorted({image.modality for image in images if image.modality}), received_at=received,
            images=len(images), priority=priority, reading_state=study.state, reader=study.reader,
            dimse_high=dimse_high,
            requested_priority=max(requested, key=lambda r: REQUESTED_PRIORITY_RANK.get(r.upper(), -1), default=""),
            ai_status=ai_status(images),
            scored_instance_ids=[image.instance_id for image in images if image.status == ResultStatus.SCORED],
        )
        if priority.worst is not None:  # the one image whose values the study shows
            worst = images[priority.worst]
            entry.total_score, entry.brixia_total, entry.p_disease = worst.total, worst.brixia, worst.p_disease
            entry.zones_scored = worst.zones_scored if worst.zones_scored is not None else len(ZONE_NAMES)
            entry.worst_instance_id = worst.instance_id
        return entry

    def study(self, uid: str) -> StudyDetail:
        """Everything about one study: its worklist row and each image's result."""
        matches = self.entries(include_read=True, study=uid, details=False)  # each record is parsed once, below
        if not matches:
            raise StudyNotFound(uid)
        with self.db.session() as session:
            rows = session.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.view_position, ScoreResult.status,
                       ScoreResult.reason, ScoreResult.message, ScoreResult.details)
                .outerjoin(ScoreResult, ScoreResult.instance_id == Instance.id)
                .where(Instance.study_instance_uid == uid, Instance.kind == "source")
                .order_by(Instance.id)
            ).all()
        records = {iid: parse_record(text) for iid, *_, text in rows if text}
        matches[0].apply_details(records)
        images = [
            ImageResultRow(
                sop_instance_uid=sop_uid, view_position=view, status=status or PENDING, reason=reason or "",
                message=message or "", scores=records.get(iid),
            )
            for iid, sop_uid, view, status, reason, message, _ in rows
        ]
        return StudyDetail(**matches[0].row().model_dump(), image_results=images)

    def exists(self, uid: str) -> bool:
        """Whether any instance of the study is held (one indexed lookup)."""
        with self.db.session() as session:
            return session.scalar(select(Instance.id).where(Instance.study_instance_uid == uid).limit(1)) is not None

    # -- reading state ---------------------------------------------------

    def _ensure(self, session: Session, uid: str) -> None:
        session.execute(upsert_insert(self.db.engine, Reading).values(study_instance_uid=uid, state="unread", reader="",
                                               updated_at=utcnow()).on_conflict_do_nothing())

    def _transition(self, uid: str, allowed_from: Any, audit: tuple[AuditAction, str] | None = None,
                    **values: Any) -> bool:
        """Move the study's reading state where ``allowed_from`` holds; ``audit`` (action, actor) is recorded
        in the same transaction, so a refused transition leaves no audit row."""
        with self.db.session() as session:  # existence checked in the transition's own transaction
            if session.scalar(select(Instance.id).where(Instance.study_instance_uid == uid).limit(1)) is None:
                raise StudyNotFound(uid)
            self._ensure(session, uid)
            transition = update(Reading).where(Reading.study_instance_uid == uid, allowed_from)
            done = rowcount(session.execute(transition.values(updated_at=utcnow(), **values))) == 1
            if done and audit is not None:
                record_audit(session, action=audit[0], actor=audit[1], study_instance_uid=uid)
            return done

    def claim(self, uid: str, reader: str) -> bool:
        """Claim for ``reader`` (an authenticated identity); False when another reader holds it or it was read.

        :class:`StudyNotFound` if unknown.
        """
        return self._transition(
            uid, or_(Reading.state == "unread", (Reading.state == "claimed") & (Reading.reader == reader)),
            (AuditAction.CLAIM, reader), state="claimed", reader=reader, claimed_at=utcnow(),
        )

    def unclaim(self, uid: str, reader: str) -> bool:
        return self._transition(uid, (Reading.state == "claimed") & (Reading.reader == reader),
                                (AuditAction.UNCLAIM, reader), state="unread", reader="", claimed_at=None)

    def mark_escalated(self, uid: str) -> bool:
        """Record an escalation; False when the study was escalated before (it fires once)."""
        return self._transition(uid, Reading.escalated_at.is_(None), escalated_at=utcnow())

    def mark_read(self, uid: str, reader: str) -> bool:
        """Mark read; allowed for the reader who claimed it, or on an unclaimed study."""
        return self._transition(
            uid, or_(Reading.state == "unread", (Reading.state == "claimed") & (Reading.reader == reader)),
            (AuditAction.READ, reader), state="read", reader=reader, read_at=utcnow(),
        )

def _group(rows: Iterable[Any]) -> list[StudyRows]:
    """Image rows (in instance order) into studies, in order of their first image."""
    studies: dict[str, StudyRows] = {}
    for (instance_id, uid, modality, received, requested, dimse, status, total, brixia, p_disease, zones_scored,
         state, reader, escalated_at) in rows:
        study = studies.get(uid)
        if study is None:
            study = studies[uid] = StudyRows(uid, state or "unread", reader or "", escalated_at is not None)
        study.images.append(ImageRow(instance_id, modality, as_utc(received), requested, dimse,
                                     status or PENDING, total, brixia, p_disease,
                                     int(zones_scored) if zones_scored is not None else None))
    return list(studies.values())
