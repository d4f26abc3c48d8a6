"""An audit event whenever a node starts with settings other than last time.

The event names the changed keys (``dicom.port``, ``web.token``), never their
values: the detail keeps one salted hash per key (scrypt for secrets), so the
next start can tell which keys changed without the audit table holding a token,
password or host.
Lists and mappings (``destinations``, ``triage.priority.base``) are one key each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from .config import SECRET_KEYS, Settings
from .observability import event
from .storage.audit import AuditAction, record_audit
from .storage.db import Database
from .storage.models import AuditEvent

log = logging.getLogger(__name__)


def setting_values(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Every leaf setting by dotted key, as JSON-ready values."""
    values: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            values |= setting_values(value, f"{prefix}{name}.")
        else:
            values[f"{prefix}{name}"] = value
    return values


#: Keys whose values are secrets or may hold one (destinations carry DICOMweb passwords).
SECRET_SETTINGS = SECRET_KEYS | {"destinations"}


def _digest(key: str, value: Any, salt: str) -> str:
    """16 hex digits of a salted hash: enough to see a change, not to read one. Secrets get scrypt, so that
    the audit table is no cheap way to test guesses of a weak token or password."""
    data = f"{salt}\0{json.dumps(value, sort_keys=True)}".encode()
    if SECRET_SETTINGS & set(key.split(".")):
        return hashlib.scrypt(data, salt=salt.encode(), n=2**14, r=8, p=1, dklen=8).hex()
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(settings: Settings, salt: str) -> dict[str, str]:
    """Dotted key -> :func:`_digest` of its value."""
    plain = json.loads(json.dumps(setting_values(settings), default=_jsonable, sort_keys=True))
    return {key: _digest(key, value, salt) for key, value in plain.items()}


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def record_config_change(db: Database, settings: Settings) -> list[str]:
    """Compare the settings with this node's last recorded ones; record an event when they differ.

    Returns the changed keys (every key at a node's first start, none when nothing changed).
    """
    actor = f"node:{settings.node_name}"
    with db.session() as session:
        last = session.scalars(select(AuditEvent).where(
            AuditEvent.actor == actor, AuditEvent.action == AuditAction.CONFIG_CHANGED.value,
        ).order_by(AuditEvent.id.desc()).limit(1)).first()
        previous: dict[str, Any] = json.loads(last.detail) if last is not None else {}
        before = previous.get("fingerprint", {})
        now = fingerprint(settings, previous.get("salt", ""))
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if not changed:
            return []
        salt = secrets.token_hex(8)
        record_audit(session, actor=actor, action=AuditAction.CONFIG_CHANGED,
                     detail={"changed": changed, "salt": salt, "fingerprint": fingerprint(settings, salt)})
    event(log, logging.INFO, "configuration changed", keys=changed if before else f"all {len(changed)} (first start)")
    return changed
