"""Operations commands of ``cxrtriage`` (check, jobs, resend, echo, backup, restore)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the operations commands to the ``cxrtriage`` command."""
