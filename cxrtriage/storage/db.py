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

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS = Path(__file__).parent / "migrations"


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


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE or DELETE run through ``Session.execute``.

    The session returns a :class:`CursorResult` for DML; its signature says ``Result``.
    """
    return cast(CursorResult[Any], result).rowcount


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def upsert_insert(engine: Engine, table: Any) -> Any:
    """INSERT with the dialect's ON CONFLICT support (``.on_conflict_do_nothing()`` and friends)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return (sqlite_insert if is_sqlite(engine) else pg_insert)(table)


class Database:
    """Engine, session factory and schema migration of one database URL."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to the newest Alembic revision (or to ``revision``)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection_engine"] = self.engine
        command.upgrade(cfg, revision)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
