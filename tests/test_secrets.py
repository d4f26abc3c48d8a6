"""No secret of the settings is ever written to the database (issue #13).

APScheduler's persistent job store pickles a job's arguments into
``apscheduler_jobs``; the jobs used to carry the whole settings object, web
token and database password included. Now a stored job is a function name.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect, select, table, text
from sqlalchemy.engine import make_url

from .harness import NodeProcess, wait_for

TOKEN = "ZZSECRETTOKEN42"
PASSWORD = "ZZDBPASSWORD42"


def secrets_in_database(url: str) -> list[str]:
    """Every table.column whose stored value contains a secret (bytes searched too: pickles)."""
    engine = create_engine(url)
    found = []
    try:
        with engine.connect() as conn:
            for name in inspect(conn).get_table_names():
                columns = [c["name"] for c in inspect(conn).get_columns(name)]
                for row in conn.execute(select(text("*")).select_from(table(name))):
                    for column, value in zip(columns, row, strict=True):
                        raw = bytes(value) if isinstance(value, (bytes, memoryview)) else str(value).encode()
                        if TOKEN.encode() in raw or PASSWORD.encode() in raw:
                            found.append(f"{name}.{column}")
    finally:
        engine.dispose()
    return found


def test_no_secret_in_the_database(tmp_path: Path, database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":  # trust auth ignores the password, but the node holds it
        url = url.set(password=PASSWORD)
    rendered = url.render_as_string(hide_password=False)
    node = NodeProcess(tmp_path / "node", rendered, web={"port": 0, "token": TOKEN},
                       triage={"retry_failed_minutes": 60.0}).start()
    try:
        node.web_url()  # up: migrations ran and the scheduler stored its persistent jobs
        engine = create_engine(rendered)
        try:
            def stored_jobs() -> int:
                with engine.connect() as conn:
                    if "apscheduler_jobs" not in inspect(conn).get_table_names():
                        return 0
                    return len(conn.execute(text("SELECT id FROM apscheduler_jobs")).all())

            assert wait_for(stored_jobs, 60, "the persistent scheduler jobs") >= 2
        finally:
            engine.dispose()
        assert secrets_in_database(rendered) == []
    finally:
        node.stop()
