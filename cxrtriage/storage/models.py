"""Tables of the node (SQLAlchemy 2 declarative; schema changes go through Alembic)."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A stored time as an aware datetime: SQLite hands back naive values, which are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class JobKind(enum.StrEnum):
    """What a job does; stored as its value in ``jobs.kind``."""

    SCORE = "score"  # score one received image
    SEND = "send"  # send one SEG, SR or SC to one destination


class JobState(enum.StrEnum):
    """Where a job is in its life; stored as its value in ``jobs.state``."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ResultStatus(enum.StrEnum):
    """The outcome of scoring one image; stored as its value in ``results.status``."""

    SCORED = "scored"
    NOT_SCORABLE = "not_scorable"
    FAILED = "failed"


class Base(DeclarativeBase):
    pass


_RANKED = "kind = 'source' AND duplicate_of_id IS NULL"


class Instance(Base):
    """One stored DICOM instance: a received image, or a SEG / SR the node wrote."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_bytes"),
        # The worklist's ranking scan (triage/ranking_sql.py; migration 0004).
        Index("ix_instances_ranking", "study_instance_uid", "received_at", "modality", "requested_priority",
              "dimse_priority", "id", sqlite_where=text(_RANKED), postgresql_where=text(_RANKED)),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body_part: Mapped[str] = mapped_column(String(16), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    requested_priority: Mapped[str] = mapped_column(String(16), default="")  # (0040,1003)
    dimse_priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    path: Mapped[str] = mapped_column(String(512))  # relative to the archive root
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8), default="source")  # source | seg | sr | sc
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), nullable=True)
    derived_from_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), nullable=True, index=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """A unit of durable work: score an instance, or send one to a destination."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("kind", "instance_id", "destination", name="uq_job"),
        Index("ix_jobs_claim", "kind", "state", "available_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # a JobKind
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    destination: Mapped[str] = mapped_column(String(64), default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher first
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value)  # a JobState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    available_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    worker: Mapped[str] = mapped_column(String(128), default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ScoreResult(Base):
    """The outcome of scoring one source instance."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))  # a ResultStatus
    reason: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    total_score: Mapped[int | None] = mapped_column(Integer, nullable=True)
    brixia_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    p_disease: Mapped[float | None] = mapped_column(Float, nullable=True)
    details: Mapped[str] = mapped_column(Text, default="{}")  # JSON of all scores
    zones_scored: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 6, or 3 when one lung was found
    algorithm_version: Mapped[str] = mapped_column(String(64), default="")
    seg_instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), nullable=True)
    sr_instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StudyRank(Base):
    """One row per study with what ranking it needs, so the worklist ranks studies, not images.

    Kept current in the transaction of every write that changes it
    (``triage/study_rank.py``: ingest of an original source image, a result,
    a purge). Settings-independent: the worklist's settings turn it into band
    and priority at each request (``triage/ranking_sql.py``). The worst image
    is chosen by one packed number (ranking zone total x 1000 + Brixia-style
    total x 2 + P(disease)), kept for both values of
    ``missing_lung_zones_affected``.
    """

    __tablename__ = "study_ranks"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))  # the first source image
    modalities: Mapped[str] = mapped_column(String(128), default="|")  # "|CR|DX|", upper case
    requested: Mapped[str] = mapped_column(String(128), default="|")  # "|HIGH|STAT|": (0040,1003), upper case
    dimse_high: Mapped[int] = mapped_column(Integer, default=0)  # 1: an image came with DIMSE priority HIGH
    pending: Mapped[int] = mapped_column(Integer, default=0)  # 1: an image has no result yet
    worst_key: Mapped[float | None] = mapped_column(Float, nullable=True)  # missing lungs' zones affected
    worst_key_plain: Mapped[float | None] = mapped_column(Float, nullable=True)  # ... not counted


class Reading(Base):
    """A radiologist's state on a study: unread, claimed by one reader, or read."""

    __tablename__ = "readings"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="unread")  # unread | claimed | read
    reader: Mapped[str] = mapped_column(String(64), default="")
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    read_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    escalated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """Who did what, when: reader actions (claim, unclaim, read), resends and configuration changes.

    ``actor`` is an authenticated identity (a reader of ``web.readers``, the
    HTTP Basic user, ``cli:<os user>`` for commands, or ``node:<name>``),
    never free text from a request body. ``detail`` is JSON without patient data.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32), index=True)  # claim | unclaim | read | resend | config_changed
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")


class NodeRecord(Base):
    """A node sharing this database: who it is and when it was last seen (its heartbeat)."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # node_name: one row per configured node
    incarnation: Mapped[str] = mapped_column(String(128))  # name:pid:random of the running process
    roles: Mapped[str] = mapped_column(String(128), default="")  # comma-separated
    version: Mapped[str] = mapped_column(String(32), default="")
    models: Mapped[str] = mapped_column(Text, default="{}")  # JSON: stage -> model version
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Lease(Base):
    """A named lease that one process holds until it expires (the scheduler's leader, for one)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
