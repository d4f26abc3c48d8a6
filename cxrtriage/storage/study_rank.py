"""One row per study with what ranking needs (``study_ranks``), kept current by every writer."""

from __future__ import annotations

from sqlalchemy.orm import Session


def refresh_study(session: Session, study_instance_uid: str) -> None:
    """Recompute the study's ranking row in the caller's transaction."""
