"""Shared fixtures: synthetic CRs, the real RG1 chest CR, a pipeline."""

from __future__ import annotations

import fcntl
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxrtriage.inference.phantom import Phantom, PhantomGenerator, write_cr

#: Seeds for tests; far from training (0..) and from the held-out evaluation set.
TEST_SEED = 2_000_000


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    return PhantomGenerator(1024, 880)(TEST_SEED, affected_zones=(0, 1, 4))


@pytest.fixture(scope="session")
def phantom_cr(tmp_path_factory: pytest.TempPathFactory, phantom: Phantom) -> Path:
    return write_cr(phantom, tmp_path_factory.mktemp("cr") / "phantom.dcm")


@pytest.fixture(scope="session")
def rg1() -> Path:
    """The real adult PA chest CR shipped by pydicom-data (MONOCHROME1, 15-bit)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:  # pragma: no cover - pydicom-data is a test dependency
        pytest.skip("pydicom-data is not installed: pip install -e '.[test]'")
    return Path(path)


@pytest.fixture(scope="session")
def rg1_j2k() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_J2KR.dcm"))


@pytest.fixture(scope="session")
def pipeline():
    from cxrtriage.inference.pipeline import Pipeline

    return Pipeline()


@pytest.fixture(scope="session")
def held_out_evaluation(pipeline, tmp_path_factory: pytest.TempPathFactory, worker_id: str):
    """The bundled models on the 200 held-out phantoms (issue #2's goals, the ranking's Spearman rho).

    Scored once per run: the first xdist worker to ask scores them and leaves the result beside the
    workers' temp folders, under a lock the others wait on (pytest-xdist's recipe for a session
    fixture run once; its ``loadgroup`` mode does not group tests under pytest 9).
    """
    from cxrtriage.inference.training.evaluation import evaluate_synthetic

    if worker_id == "master":  # not under xdist
        return evaluate_synthetic(pipeline, images=200)
    shared = tmp_path_factory.getbasetemp().parent / "held-out-evaluation.pickle"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shared.exists():
            return pickle.loads(shared.read_bytes())
        result = evaluate_synthetic(pipeline, images=200)
        shared.write_bytes(pickle.dumps(result))
        return result


def _database_backends() -> list[str]:
    return ["sqlite", "postgresql"] if os.environ.get("CXRTRIAGE_TEST_DATABASE_URL") else ["sqlite"]


@pytest.fixture(params=_database_backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database. Every test using it runs on SQLite and, when
    CXRTRIAGE_TEST_DATABASE_URL points at a PostgreSQL server, again on
    PostgreSQL (a new database per test, dropped afterwards)."""
    server = os.environ.get("CXRTRIAGE_TEST_DATABASE_URL")
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cxrtriage.db'}"
        return
    assert server
    import sqlalchemy as sa

    from cxrtriage.storage.db import make_engine

    name = f"cxrtriage_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(server).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


@pytest.fixture
def database(database_url: str):
    from cxrtriage.storage.db import Database

    db = Database(database_url)
    db.migrate()
    yield db
    db.dispose()
