"""Engine and sessions for SQLite (default, WAL) and PostgreSQL.

SQLite: pysqlite's default transaction handling opens transactions lazily,
so a SELECT followed by an UPDATE can lose updates between threads without
any error. We switch pysqlite to autocommit (``isolation_level=None``) and
issue ``BEGIN IMMEDIATE`` ourselves at the start of every transaction: the
write lock is taken up front and transactions are truly serialised.
``synchronous=FULL`` makes a commit durable before it returns, which the
storage SCP relies on before it acknowledges an image.

Both engines hide bound parameters (``hide_parameters=True``): an error's
text would otherwise quote the patient name, ID and accession number of the
statement that failed, and such texts end up in logs and job errors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS = Path(__file__).parent / "migrations"

log = logging.getLogger("cxrtriage.storage.db")


class DatabaseTooNew(Exception):
    """The database was migrated by a newer cxrtriage: this code does not know its schema revision.

    ``str()`` is the one-line message an operator reads; the command prints it.
    """

    def __init__(self, revision: str, head: str) -> None:
        super().__init__(
            f"database schema revision {revision} is newer than this cxrtriage knows (newest: {head}); "
            "upgrade cxrtriage, or restore a backup taken before the upgrade"
        )
        self.revision, self.head = revision, head


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands against this code's migrations."""

    current: str | None  # None: no schema yet
    head: str
    known: bool  # False: a revision this code does not have (a newer cxrtriage migrated it)

    @property
    def pending(self) -> bool:
        return self.known and self.current != self.head


#: The PostgreSQL advisory lock (a number of cxrtriage's own) held while one node migrates the schema.
MIGRATION_LOCK = 7_406_551


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg"))
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)


def database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away or busy (refused, cut, restarting, locked), not that the
    statement or the data is wrong: the same work succeeds once it answers again."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE or DELETE run through ``Session.execute``.

    The session returns a :class:`CursorResult` for DML; its signature says ``Result``.
    """
    return cast(CursorResult[Any], result).rowcount


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


def upsert_insert(engine: Engine | Connection, table: Any) -> Any:
    """INSERT with the dialect's ON CONFLICT support (``.on_conflict_do_nothing()`` and friends)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return (sqlite_insert if is_sqlite(engine) else pg_insert)(table)


class Database:
    """Engine, session factory and schema migration of one database URL."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _alembic(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection_engine"] = self.engine
        return cfg

    def schema_state(self) -> SchemaState:
        """The database's Alembic revision against this code's newest (nothing is changed)."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(self._alembic())
        head = script.get_current_head() or ""
        with self.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        known = current is None or any(r.revision == current for r in script.walk_revisions())
        return SchemaState(current, head, known)

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to the newest Alembic revision (or to ``revision``).

        Logs ``database migration`` (from, to). A SQLite database with data is
        first copied next to itself (``<db>.pre-<to>.bak``, online backup API),
        so a failed or regretted upgrade can be rolled back. A database whose
        revision this code does not know raises :class:`DatabaseTooNew`
        instead of Alembic's own error. On PostgreSQL an advisory lock lets
        one of several nodes starting at once migrate while the others wait
        and then find the schema current.
        """
        if is_sqlite(self.engine):
            self._migrate(revision)
            return
        with self.engine.connect() as lock:
            lock.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
            try:
                self._migrate(revision)
            finally:
                lock.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
                lock.commit()

    def _migrate(self, revision: str) -> None:
        from alembic import command

        state = self.schema_state()
        if not state.known:
            raise DatabaseTooNew(str(state.current), state.head)
        target = state.head if revision == "head" else revision
        if state.current == target:
            return
        fields: dict[str, object] = {"from_revision": state.current or "", "to_revision": target}
        if state.current is not None and is_sqlite(self.engine):
            backup = self._pre_migration_backup(target)
            if backup is not None:
                fields["backup"] = str(backup)
        log.info("database migration", extra={"fields": fields})
        command.upgrade(self._alembic(), revision)

    def _pre_migration_backup(self, target: str) -> Path | None:
        """The copy of a SQLite database with data taken before migrating it to ``target``."""
        from .backup import is_empty, sqlite_backup

        database = self.engine.url.database
        if not database or database == ":memory:" or is_empty(self):
            return None
        path = Path(f"{database}.pre-{target}.bak")
        sqlite_backup(Path(database), path)
        return path

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
