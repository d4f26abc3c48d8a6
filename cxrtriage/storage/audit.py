"""The audit trail: one row per reader action, resend and configuration change (``audit_events``)."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping

from sqlalchemy.orm import Session

from .models import AuditEvent


class AuditAction(enum.StrEnum):
    CLAIM = "claim"
    UNCLAIM = "unclaim"
    READ = "read"
    RESEND = "resend"
    CONFIG_CHANGED = "config_changed"


def record_audit(session: Session, *, actor: str, action: AuditAction, study_instance_uid: str = "",
                 detail: Mapping[str, object] | None = None) -> AuditEvent:
    """Add one audit row in the caller's transaction (so it commits, or not, with the action itself).

    ``detail`` must hold no patient data (no names, IDs or accession numbers).
    """
    row = AuditEvent(actor=actor, action=action.value, study_instance_uid=study_instance_uid,
                     detail=json.dumps(dict(detail or {}), sort_keys=True))
    session.add(row)
    return row
