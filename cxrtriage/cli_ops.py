"""Operations commands of ``cxrtriage`` (check, echo, jobs, resend, backup, restore).

Each prints short lines and exits 0 on success, 1 on failure, 2 on bad usage
(a wrong option, an unusable config.yaml). docs/operations.md shows them in use.
"""

from __future__ import annotations

import datetime as dt
import getpass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from .config import Peer, Settings
    from .storage.db import Database
    from .storage.models import JobKind

console = Console()
CONFIG_OPTION = typer.Option(None, "--config", "-c", help="config.yaml (default: built-in settings)")
jobs_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The job queue: list and retry jobs.")


def load_settings_or_exit(path: Path | None, *, code: int = 2, roles: str | None = None) -> Settings:
    """config.yaml (``roles``, comma-separated, replacing its ``node.roles``), or one red line per problem
    and exit ``code`` (no traceback)."""
    from .config import ConfigError, NodeSettings, load_settings

    try:
        settings = load_settings(path)
        if roles is None:
            return settings
        try:
            node = NodeSettings(roles=roles)  # the validator splits the comma-separated string
        except ValidationError as exc:
            raise ConfigError(f"--roles {roles!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return settings.model_copy(update={"node": node})
    except ConfigError as exc:
        for line in str(exc).splitlines():
            console.print(f"[red]config error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]FAIL[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _database(settings: Settings) -> Database:
    """The configured database, whose schema this code must know (else exit 1 with the reason)."""
    from .storage.db import Database

    db = Database(settings.storage.database_url)
    try:
        state = db.schema_state()
    except Exception as exc:  # noqa: BLE001 - unreachable, wrong password, ...: one line, no traceback
        db.dispose()
        raise _fail(f"database unreachable: {str(exc).strip().splitlines()[0]}") from None
    if not state.known or state.current is None:
        db.dispose()
        raise _fail(f"database schema {state.current or 'missing'}: this cxrtriage needs {state.head} "
                    "(run the node once, or upgrade cxrtriage)")
    return db


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def check(config: Path | None = CONFIG_OPTION,
          timeout: float = typer.Option(5.0, min=0.1, help="seconds per network check")) -> None:
    """Check config, database, archive, TLS files, model files and every destination; exit 1 if any fails."""
    from .ops.checks import Check, check_all

    settings = load_settings_or_exit(config, code=1)
    results: list[Check] = []
    for result in [Check(True, f"config {config or '(built-in defaults)'} valid"), *check_all(settings,
                                                                                               timeout=timeout)]:
        results.append(result)
        console.print(("[green]ok  [/] " if result.ok else "[red]FAIL[/] ") + escape(result.what),
                      highlight=False, soft_wrap=True)
    failed = sum(not r.ok for r in results)
    console.print(f"{len(results)} checks, {failed} failed", highlight=False)
    if failed:
        raise typer.Exit(1)


def echo(
    ae_title: str | None = typer.Argument(None, metavar="[AE]", help="a configured destination or move destination"),
    config: Path | None = CONFIG_OPTION,
    host: str | None = typer.Option(None, help="peer address (instead of a configured AE)"),
    port: int = typer.Option(104, min=1, max=65535, help="peer port, with --host"),
    aet: str | None = typer.Option(None, help="peer AE title, with --host"),
    timeout: float = typer.Option(10.0, min=0.1, help="seconds to connect and to wait for the answer"),
) -> None:
    """C-ECHO a peer (PS3.4 Annex A); prints the status and the round trip in ms."""
    from .config import Peer
    from .scp.echo import EchoFailed
    from .scp.echo import echo as c_echo

    settings = load_settings_or_exit(config)
    peer: Peer
    if host:
        if ae_title:
            raise typer.BadParameter("give either AE or --host, not both")
        peer = Peer(ae_title=aet or ae_title or "ANY-SCP", host=host, port=port)
    elif ae_title:
        peer = _configured_peer(settings, ae_title)
    else:
        raise typer.BadParameter("give a configured AE title, or --host (with --port and --aet)")
    if peer.type != "dimse":
        raise _fail(f"{peer.ae_title} is a dicomweb destination: C-ECHO is DIMSE only (cxrtriage check tests it)", 2)
    try:
        result = c_echo(peer, settings.dicom.ae_title, timeout=timeout)
    except EchoFailed as exc:
        raise _fail(str(exc)) from None
    if result.status != 0:
        raise _fail(f"C-ECHO {peer.ae_title}: status 0x{result.status:04X}")
    console.print(f"[green]ok[/] C-ECHO {escape(peer.ae_title)}@{peer.host}:{peer.port}: status 0x0000, "
                  f"{result.milliseconds:.0f} ms", highlight=False)


def _configured_peer(settings: Settings, ae_title: str) -> Peer:
    for peer in [*settings.destinations, *settings.dicom.move_destinations]:
        if peer.ae_title == ae_title:
            return peer
    known = sorted({p.ae_title for p in [*settings.destinations, *settings.dicom.move_destinations]})
    console.print(f"[red]unknown AE[/] {escape(ae_title)}; configured: {', '.join(known) or 'none'}",
                  highlight=False)
    raise typer.Exit(2)


@jobs_app.command("list")
def jobs_list(
    config: Path | None = CONFIG_OPTION,
    failed: bool = typer.Option(False, "--failed", metavar="", help="only failed jobs"),
    kind: str | None = typer.Option(None, help="score or send"),
    limit: int = typer.Option(50, min=1, help="newest jobs shown"),
) -> None:
    """The newest jobs: id, kind, state, attempts, destination, last error (no patient data), updated
    (when it finished, else when it was queued)."""
    from rich.table import Table

    from .storage.models import JobState, as_utc
    from .storage.queue import JobQueue

    job_kind = _kind(kind)
    db = _database(load_settings_or_exit(config))
    try:
        rows = JobQueue(db).jobs(state=JobState.FAILED if failed else None, kind=job_kind, limit=limit)
    finally:
        db.dispose()
    table = Table(box=None, header_style="bold")
    for column in ("id", "kind", "state", "attempts", "destination", "last error", "updated"):
        table.add_column(column, overflow="fold")
    for job in rows:
        updated = job.finished_at or job.created_at  # no update time is stored: finished, else created
        table.add_row(str(job.id), job.kind, job.state, f"{job.attempts}/{job.max_attempts}", job.destination,
                      escape(job.last_error.splitlines()[0][:160] if job.last_error else ""),
                      as_utc(updated).strftime("%Y-%m-%d %H:%M:%SZ"))
    console.print(table)
    console.print(f"{len(rows)} jobs", highlight=False)


def _kind(kind: str | None) -> JobKind | None:
    from .storage.models import JobKind

    if kind is None:
        return None
    try:
        return JobKind(kind)
    except ValueError:
        raise typer.BadParameter("--kind is score or send") from None


@jobs_app.command("retry")
def jobs_retry(
    config: Path | None = CONFIG_OPTION,
    failed: bool = typer.Option(False, "--failed", metavar="", help="every failed job"),
    ids: list[int] = typer.Option([], "--id", help="this failed job (repeat for more)"),
) -> None:
    """Failed jobs back to pending, with fresh attempts, available now; prints how many."""
    from .storage.queue import JobQueue

    if not failed and not ids:
        raise typer.BadParameter("give --failed, or one or more --id")
    db = _database(load_settings_or_exit(config))
    try:
        queue = JobQueue(db)
        count = queue.retry_failed() if failed else queue.retry_ids(ids)
    finally:
        db.dispose()
    console.print(f"{count} failed jobs back to pending", highlight=False)


def resend(
    study: list[str] = typer.Option([], "--study", help="Study Instance UID (repeat for more)"),
    since: str | None = typer.Option(None, help="every study scored at or after this ISO time (UTC if no zone)"),
    destination: str | None = typer.Option(None, help="only this configured destination (AE title)"),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Queue the results (SEG, SR, ...) of studies to be sent again to each destination (idempotent by UID)."""
    from .storage.queue import JobQueue
    from .storage.resend import resend_studies, studies_scored_since

    if bool(study) == bool(since):
        raise typer.BadParameter("give --study or --since (one of them)")
    settings = load_settings_or_exit(config)
    configured = [p.ae_title for p in settings.destinations]
    if destination is not None and destination not in configured:
        raise _fail(f"{destination} is not a configured destination ({', '.join(configured) or 'none'})", 2)
    targets = [destination] if destination else configured
    if not targets:
        raise _fail("no destinations configured", 2)
    start = _iso_time(since) if since else None
    db = _database(settings)
    try:
        queue = JobQueue(db)
        studies = studies_scored_since(queue, start) if start else study
        done = resend_studies(queue, studies, targets, actor=_actor(), max_attempts=settings.workers.max_attempts)
    finally:
        db.dispose()
    for item in done:
        console.print(f"{item.study_instance_uid}: {item.objects} objects, {item.jobs} send jobs", highlight=False)
    console.print(f"{len(done)} studies, {sum(d.jobs for d in done)} send jobs to {', '.join(targets)}",
                  highlight=False)
    if not done:
        raise _fail(f"no study scored since {start.isoformat() if start else '?'}")
    empty = [d.study_instance_uid for d in done if not d.objects]
    if empty:
        raise _fail(f"{len(empty)} studies have no results to send: {', '.join(empty[:5])}")


def _iso_time(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--since {value!r} is not an ISO time (e.g. 2026-03-01T08:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def backup(
    dest: Path = typer.Argument(..., help="a new folder for the backup"),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Copy the database consistently (SQLite backup API or pg_dump -Fc), the archive manifest and the config."""
    from .storage.backup import BackupError
    from .storage.backup import backup as make_backup

    settings = load_settings_or_exit(config)
    db = _database(settings)
    try:
        summary = make_backup(db, settings.storage.database_url, dest, config)
    except (BackupError, OSError) as exc:
        raise _fail(f"backup: {exc}") from None
    finally:
        db.dispose()
    console.print(f"[green]ok[/] backup in {summary.folder}: {summary.database_file.name}, manifest of "
                  f"{summary.instances} archived files", highlight=False)


def restore(
    src: Path = typer.Argument(..., help="a folder written by cxrtriage backup"),
    config: Path | None = CONFIG_OPTION,
    force: bool = typer.Option(False, "--force", metavar="", help="overwrite a database that holds data"),
) -> None:
    """Restore the database of a backup; then copy the archive back and run: cxrtriage archive verify."""
    from .storage.backup import BackupError
    from .storage.backup import restore as restore_backup
    from .storage.db import Database

    settings = load_settings_or_exit(config)
    db = Database(settings.storage.database_url)
    try:
        restored = restore_backup(db, settings.storage.database_url, src, force=force)
    except (BackupError, OSError) as exc:
        raise _fail(f"restore: {exc}") from None
    finally:
        db.dispose()
    console.print(f"[green]ok[/] database restored from {restored}; copy the archive folder back "
                  f"({settings.storage.archive_dir}), then run: cxrtriage archive verify", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the operations commands to the ``cxrtriage`` command."""
    app.command()(check)
    app.command()(echo)
    app.add_typer(jobs_app, name="jobs")
    app.command()(resend)
    app.command()(backup)
    app.command()(restore)
