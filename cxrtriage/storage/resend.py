"""Send a study's results again: after a PACS lost them, or to a destination added after scoring.

The results of a study are every instance derived from its source images
(``derived_from_id``: the SEG, the SR, a Secondary Capture, whatever later
versions add). Each gets a send job per destination: a new one, or the
existing one back to pending with fresh attempts. Sending the same SOP
Instance UID twice is harmless: a PACS stores an instance once by its UID
(PS3.4 B.4.1), so a resend never duplicates a result.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import aliased

from .audit import AuditAction, record_audit
from .models import Instance, ScoreResult
from .queue import JobQueue


@dataclass(frozen=True)
class StudyResend:
    study_instance_uid: str
    objects: int  # derived instances found
    jobs: int  # send jobs queued (objects x destinations)


def studies_scored_since(queue: JobQueue, since: dt.datetime) -> list[str]:
    """Studies with a result recorded at or after ``since``, oldest first."""
    query = (select(ScoreResult.study_instance_uid).where(ScoreResult.created_at >= since)
             .group_by(ScoreResult.study_instance_uid).order_by(ScoreResult.study_instance_uid))
    with queue.db.session() as session:
        return list(session.scalars(query))


def resend_studies(
    queue: JobQueue, studies: Sequence[str], destinations: Collection[str], *, actor: str, max_attempts: int = 5,
) -> list[StudyResend]:
    """Queue sends of every derived object of ``studies`` to ``destinations``; one audit event per study."""
    source = aliased(Instance)
    done: list[StudyResend] = []
    for study in studies:
        with queue.db.session() as session:
            derived = list(session.scalars(
                select(Instance.id).join(source, Instance.derived_from_id == source.id)
                .where(source.study_instance_uid == study).order_by(Instance.id)
            ))
            for instance_id in derived:
                for destination in sorted(destinations):
                    queue.resend(session, instance_id, destination, max_attempts=max_attempts)
            record_audit(session, actor=actor, action=AuditAction.RESEND, study_instance_uid=study,
                         detail={"objects": len(derived), "destinations": sorted(destinations)})
        done.append(StudyResend(study, len(derived), len(derived) * len(destinations)))
    return done
