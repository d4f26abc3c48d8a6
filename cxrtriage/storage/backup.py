"""Consistent copies of the database, and the archive's manifest.

A live SQLite database in WAL mode is three files (``db``, ``db-wal``,
``db-shm``) and committed pages may still sit only in the WAL: copying the
main file alone loses them, and copying all three while the node writes
gives a torn copy. :func:`sqlite_backup` uses SQLite's online backup API
(``sqlite3.Connection.backup``), which copies a consistent snapshot page by
page while writers go on. PostgreSQL is copied with ``pg_dump -Fc`` (one
consistent snapshot, one transaction) and restored with ``pg_restore``;
the password never appears on a command line (``PGPASSWORD`` in the child's
environment), where ``ps`` would show it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import inspect, select
from sqlalchemy.engine import URL, make_url

from .db import Database
from .models import Instance

DATABASE_SQLITE = "database.sqlite"
DATABASE_PG = "database.pgdump"
MANIFEST = "archive-manifest.jsonl"
CONFIG = "config.yaml"
INFO = "backup.json"


class BackupError(RuntimeError):
    """A backup or restore could not be made; ``str()`` is the one-line reason."""


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for another database (or an in-memory one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def sqlite_backup(source: Path, target: Path, *, self_contained: bool = True) -> None:
    """Copy a (possibly live, WAL-mode) SQLite database with the online backup API.

    ``self_contained``: leave the copy in rollback-journal mode, one file with no ``-wal`` beside it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(source, timeout=60)
    try:
        dst = sqlite3.connect(target, timeout=60)
        try:
            src.backup(dst)
            if self_contained:
                dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()


def _pg_args(url: URL) -> tuple[list[str], dict[str, str]]:
    """libpq connection options and environment of a URL, the password only in the environment."""
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    # URL.set(password=None) keeps the password (None means "unchanged"): build the URL without it.
    bare = URL.create("postgresql", username=url.username, host=url.host, port=url.port, database=url.database,
                      query=url.query)
    args = ["--dbname", bare.render_as_string(hide_password=False)]
    return args, env


def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    if shutil.which(argv[0]) is None:
        raise BackupError(f"{argv[0]} not found on PATH (install the PostgreSQL client tools)")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise BackupError(f"{what} failed: {last}")


def pg_dump(url: str, target: Path) -> None:
    """``pg_dump -Fc`` of the database of ``url`` into ``target``."""
    args, env = _pg_args(make_url(url))
    _run(["pg_dump", "-Fc", "--no-owner", "--file", str(target), *args], env, "pg_dump")


def pg_restore(url: str, source: Path) -> None:
    """Restore a ``pg_dump -Fc`` file into the (empty or emptied) database of ``url``."""
    args, env = _pg_args(make_url(url))
    _run(["pg_restore", "--no-owner", "--clean", "--if-exists", "--single-transaction", *args, str(source)],
         env, "pg_restore")


@dataclass(frozen=True)
class ManifestEntry:
    sop_instance_uid: str
    path: str  # relative to the archive root
    sha256: str
    size: int


def manifest(db: Database) -> Iterator[ManifestEntry]:
    """Every catalog row's file, as the catalog records it (the archive is not read)."""
    query = select(Instance.sop_instance_uid, Instance.path, Instance.sha256, Instance.size).order_by(Instance.id)
    with db.session() as session:
        for uid, path, sha, size in session.execute(query):
            yield ManifestEntry(uid, path, sha, size)


def write_manifest(entries: Iterable[ManifestEntry], target: Path) -> int:
    """One JSON object per line; returns how many."""
    count = 0
    with target.open("w") as out:
        for entry in entries:
            out.write(json.dumps(entry.__dict__, sort_keys=True) + "\n")
            count += 1
    return count


def is_empty(db: Database) -> bool:
    """No tables at all, or tables without a single catalog row, job or result."""
    tables = set(inspect(db.engine).get_table_names())
    if not tables - {"alembic_version"}:
        return True
    from sqlalchemy import text

    with db.engine.connect() as conn:
        return not any(conn.execute(text(f"SELECT 1 FROM {t} LIMIT 1")).first()  # noqa: S608 - known table names
                       for t in ("instances", "jobs", "results", "audit_events") if t in tables)


@dataclass(frozen=True)
class BackupSummary:
    folder: Path
    database_file: Path
    instances: int


def backup(db: Database, url: str, target: Path, config_file: Path | None = None) -> BackupSummary:
    """Database copy, archive manifest and config file into the new folder ``target``."""
    if target.exists():
        raise BackupError(f"{target} already exists: a backup goes into a new folder")
    target.mkdir(parents=True)
    source = sqlite_path(url)
    if source is not None:
        if not source.is_file():
            raise BackupError(f"database file not found: {source}")
        database_file = target / DATABASE_SQLITE
        sqlite_backup(source, database_file)
    elif make_url(url).get_backend_name() == "postgresql":
        database_file = target / DATABASE_PG
        pg_dump(url, database_file)
    else:
        raise BackupError(f"cannot back up a {make_url(url).get_backend_name()} database")
    count = write_manifest(manifest(db), target / MANIFEST)
    if config_file is not None:
        shutil.copy2(config_file, target / CONFIG)
    info = {"database": database_file.name, "backend": make_url(url).get_backend_name(), "instances": count,
            "database_sha256": _sha256(database_file)}
    (target / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return BackupSummary(target, database_file, count)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def restore(db: Database, url: str, source: Path, *, force: bool = False) -> Path:
    """Restore the database of the backup folder ``source`` into ``url``; returns the file restored.

    Refuses a database that holds data unless ``force``. The archive folder is
    not part of the backup (the operator copies it, e.g. with rsync);
    ``cxrtriage archive verify`` then checks it against the restored catalog.
    """
    info_path = source / INFO
    if not info_path.is_file():
        raise BackupError(f"{source} is not a cxrtriage backup (no {INFO})")
    info = json.loads(info_path.read_text())
    database_file = source / str(info["database"])
    if _sha256(database_file) != info.get("database_sha256"):
        raise BackupError(f"{database_file} does not match the checksum recorded at backup time")
    backend = make_url(url).get_backend_name()
    if backend != info["backend"]:
        raise BackupError(f"the backup is of a {info['backend']} database, the configured one is {backend}")
    if not force and not is_empty(db):
        raise BackupError("the configured database is not empty: restore with --force to overwrite it")
    target = sqlite_path(url)
    if target is not None:
        db.dispose()
        # Through SQLite, not a file copy: the target's WAL stays consistent with the restored pages.
        sqlite_backup(database_file, target, self_contained=False)
    else:
        db.dispose()
        pg_restore(url, database_file)
    return database_file
