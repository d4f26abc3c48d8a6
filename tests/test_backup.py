"""Backup, restore and schema migrations on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.engine import make_url

from cxrtriage.storage.backup import MANIFEST, _pg_args, sqlite_backup
from cxrtriage.storage.db import Database, DatabaseTooNew
from cxrtriage.storage.models import Base, Instance, JobKind
from cxrtriage.storage.queue import JobQueue

from .harness import cli, fill_random_studies


def snapshot(db: Database) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, in primary-key order (times as UTC text: SQLite keeps them naive)."""
    def norm(value: object) -> object:
        if isinstance(value, dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC).isoformat()
        return value

    with db.engine.connect() as conn:
        return {table.name: [tuple(norm(v) for v in row) for row in conn.execute(
            table.select().order_by(*table.primary_key.columns))] for table in Base.metadata.sorted_tables}


def fill(db: Database) -> None:
    fill_random_studies(db, 12, seed=5, now=dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    queue = JobQueue(db)
    with db.session() as session:
        for instance_id in session.scalars(select(Instance.id).limit(5)):
            queue.enqueue(session, JobKind.SCORE, instance_id)


def wipe(db: Database, url: str) -> None:
    """The database gone: the SQLite file deleted, or every PostgreSQL table dropped."""
    if db.engine.dialect.name == "sqlite":
        db.dispose()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db.engine.url.database}{suffix}").unlink(missing_ok=True)
        return
    with db.engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    db.dispose()


def test_backup_wipe_restore_gives_the_same_rows(database: Database, tmp_path: Path) -> None:
    url = database.engine.url.render_as_string(hide_password=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"database_url": url, "archive_dir": str(tmp_path / "archive")}}))
    fill(database)
    before = snapshot(database)
    assert before["instances"] and before["jobs"] and before["results"]

    code, out = cli("backup", str(tmp_path / "bk"), "-c", str(config))
    assert code == 0, out
    files = sorted(p.name for p in (tmp_path / "bk").iterdir())
    assert "config.yaml" in files and MANIFEST in files and "backup.json" in files
    manifest = [json.loads(line) for line in (tmp_path / "bk" / MANIFEST).read_text().splitlines()]
    assert [(m["sop_instance_uid"], m["path"], m["sha256"], m["size"]) for m in manifest] == [
        (r.sop_instance_uid, r.path, r.sha256, r.size) for r in sorted(_instances(database), key=lambda r: r.id)]
    assert cli("backup", str(tmp_path / "bk"), "-c", str(config))[0] == 1  # never into an existing folder

    code, out = cli("restore", str(tmp_path / "bk"), "-c", str(config))
    assert code == 1 and "not empty" in out, out  # refuses to overwrite data

    wipe(database, url)
    code, out = cli("restore", str(tmp_path / "bk"), "-c", str(config))
    assert code == 0 and "archive verify" in out, out
    restored = Database(url)
    try:
        assert snapshot(restored) == before
        assert restored.schema_state().current == restored.schema_state().head
        with restored.session() as session:  # the restored database takes writes
            JobQueue(restored).enqueue(session, JobKind.SCORE, before["instances"][-1][0])
    finally:
        restored.dispose()
    assert cli("restore", str(tmp_path / "bk"), "-c", str(config), "--force")[0] == 0


def _instances(db: Database) -> list[Instance]:
    with db.session() as session:
        return list(session.scalars(select(Instance)))


def test_online_backup_of_a_live_wal_database_has_its_committed_rows(tmp_path: Path) -> None:
    live = tmp_path / "live.db"
    db = Database(f"sqlite:///{live}")
    db.migrate()
    reader = sqlite3.connect(live, isolation_level=None)
    try:  # a reader's open snapshot keeps the new pages out of the main file (no checkpoint past it)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM instances").fetchone()
        fill(db)
        (tmp_path / "raw.db").write_bytes(live.read_bytes())  # what a file copy of the main file gets
        sqlite_backup(live, tmp_path / "copy.db")
    finally:
        reader.close()
    expected = len(_instances(db))
    db.dispose()
    raw, copy = sqlite3.connect(tmp_path / "raw.db"), sqlite3.connect(tmp_path / "copy.db")
    try:
        in_raw = raw.execute("SELECT count(*) FROM sqlite_master WHERE name = 'instances'").fetchone()[0] and \
            raw.execute("SELECT count(*) FROM instances").fetchone()[0]
        assert in_raw < expected  # the main file alone lacks rows (here even the tables) still in the WAL
        assert copy.execute("SELECT count(*) FROM instances").fetchone()[0] == expected > 0
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        raw.close()
        copy.close()


# --- migrations ---------------------------------------------------------------------------------------------------


def test_migration_backs_up_a_sqlite_database_with_data_and_logs(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "old.db"
    db = Database(f"sqlite:///{path}")
    db.migrate("0005")
    fill_random_studies(db, 3, seed=6, now=dt.datetime(2026, 5, 1, tzinfo=dt.UTC), ranked=False)
    with caplog.at_level(logging.INFO, logger="cxrtriage.storage.db"):
        db.migrate()
    head = db.schema_state().head
    backup = Path(f"{path}.pre-{head}.bak")
    assert backup.is_file()
    events = [r for r in caplog.records if r.getMessage() == "database migration"]
    assert len(events) == 1
    assert events[0].fields == {"from_revision": "0005", "to_revision": head, "backup": str(backup)}  # type: ignore[attr-defined]
    old = sqlite3.connect(backup)
    try:
        assert old.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0005"
        assert old.execute("SELECT count(*) FROM instances").fetchone()[0] == len(_instances(db)) > 0
    finally:
        old.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cxrtriage.storage.db"):
        db.migrate()  # current: nothing to do, nothing logged
    assert not [r for r in caplog.records if r.getMessage() == "database migration"]
    db.dispose()


def test_migrating_an_empty_database_takes_no_backup(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'new.db'}")
    db.migrate("0003")
    db.migrate()
    db.dispose()
    assert [p.name for p in tmp_path.iterdir() if ".bak" in p.name] == []


def test_a_database_from_a_newer_cxrtriage_is_refused(database: Database, tmp_path: Path) -> None:
    with database.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0999'")
    with pytest.raises(DatabaseTooNew, match="0999 is newer than this cxrtriage knows"):
        database.migrate()
    url = database.engine.url.render_as_string(hide_password=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"database_url": url, "archive_dir": str(tmp_path / "a")}}))
    code, out = cli("jobs", "list", "-c", str(config))
    assert code == 1 and "0999" in out and len(out.strip().splitlines()) == 1, out


def test_pg_backup_keeps_the_password_off_the_command_line() -> None:
    args, env = _pg_args(make_url("postgresql+psycopg://triage:s3cret@db.example:5433/cxr?sslmode=require"))
    assert "s3cret" not in " ".join(args) and env["PGPASSWORD"] == "s3cret"
    assert args == ["--dbname", "postgresql://triage@db.example:5433/cxr?sslmode=require"]


def test_nodes_starting_together_migrate_once(database_url: str) -> None:
    """Several nodes starting at once on a new PostgreSQL database: one migrates, the others wait for it."""
    if database_url.startswith("sqlite"):
        pytest.skip("a SQLite database has one node")
    import threading

    databases = [Database(database_url) for _ in range(3)]
    barrier, failures = threading.Barrier(3), []

    def start(db: Database) -> None:
        barrier.wait(timeout=10)
        try:
            db.migrate()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(repr(exc))

    threads = [threading.Thread(target=start, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert failures == []
        state = databases[0].schema_state()
        assert state.current == state.head
    finally:
        for db in databases:
            db.dispose()
