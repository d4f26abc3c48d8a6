"""study_ranks: one ranking row per study, kept current by every writer (triage/study_rank.py).

The rows must always equal what :func:`rebuild` computes from the images:
after the migration fills them for a database that had none, after each
writer (ingest of a real C-STORE, the score stage's result, a purge), and
when two scorers record results of one study at the same moment.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import select

from cxrtriage.config import Settings
from cxrtriage.inference.instance import InstanceRefused
from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.observability import Metrics
from cxrtriage.scp.ingest import Ingest
from cxrtriage.stages.score import ScoreStage
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Instance, JobKind, Reading, ScoreResult, StudyRank
from cxrtriage.storage.queue import JobQueue
from cxrtriage.triage import jobs
from cxrtriage.triage.study_rank import rebuild, refresh_study

from .harness import fill_random_studies

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def stored_rows(db: Database) -> dict[str, tuple[Any, ...]]:
    with db.session() as session:
        return {r.study_instance_uid: (r.received_at.replace(tzinfo=None), r.modalities, r.requested, r.dimse_high,
                                       r.pending, r.worst_key, r.worst_key_plain)
                for r in session.scalars(select(StudyRank))}


def rebuilt_rows(db: Database) -> dict[str, tuple[Any, ...]]:
    with db.session() as session:
        rebuild(session)
    return stored_rows(db)


def test_the_migration_fills_the_rows_rebuild_would(database_url: str) -> None:
    db = Database(database_url)
    try:
        db.migrate("0005")  # a database from before study_ranks, holding studies
        fill_random_studies(db, 300, seed=3, now=NOW, ranked=False)
        db.migrate()
        migrated = stored_rows(db)
        assert len(migrated) == 300
        assert any(r[2] != "," for r in migrated.values()) and any(r[3] for r in migrated.values())
        assert migrated == rebuilt_rows(db)
    finally:
        db.dispose()


def test_every_writer_keeps_its_study_row_current(database_url: str, tmp_path: Path) -> None:
    db = Database(database_url)
    db.migrate()
    archive, queue, metrics = Archive(tmp_path / "archive"), JobQueue(db), Metrics()
    try:
        ingest = Ingest(db, archive, queue, metrics, 0, 3)
        generator = PhantomGenerator(320, 288)
        files = [write_cr(generator(seed), tmp_path / f"{seed}.dcm") for seed in (1, 2)]
        for path in files:
            assert ingest.store(path.read_bytes(), "1.2.840.10008.5.1.4.1.1.1", "MODALITY", 1) == 0
        assert ingest.store(files[0].read_bytes(), "1.2.840.10008.5.1.4.1.1.1", "MODALITY", 1) == 0
        rows = stored_rows(db)
        assert len(rows) == 2 and all(r[4] == 1 and r[3] == 1 for r in rows.values())  # pending, DIMSE HIGH
        assert rows == rebuilt_rows(db)

        stage = ScoreStage(db, archive, queue, metrics, lambda *a: None, destinations=[], ae_title="CXRTRIAGE",
                           max_attempts=3)
        job = queue.claim(JobKind.SCORE, "w", 60)
        assert job is not None
        with db.session() as session:
            source = session.get(Instance, job.instance_id)
        assert source is not None
        stage.record_refused(job, "w", source, InstanceRefused("lateral_view", "a lateral view"))
        refused = stored_rows(db)[source.study_instance_uid]
        assert refused[4] == 0 and refused[5] is None  # no longer pending, nothing scored: AI failed
        assert stored_rows(db) == rebuilt_rows(db)

        with db.session() as session:
            for uid in rows:
                session.add(Reading(study_instance_uid=uid, state="read", reader="dr_a"))
        settings = Settings.model_validate({"storage": {"database_url": database_url,
                                                        "archive_dir": str(tmp_path / "archive")},
                                            "triage": {"retention_days": 1e-9}})
        assert jobs.purge(settings) == 1  # the refused study; the other still has its score job pending
        assert set(stored_rows(db)) == set(rows) - {source.study_instance_uid}
        assert stored_rows(db) == rebuilt_rows(db)
    finally:
        db.dispose()


def test_two_writers_of_one_study_at_once_leave_the_right_row(database_url: str) -> None:
    """Two scorers record results for two images of one study in overlapping transactions."""
    db = Database(database_url)
    db.migrate()
    try:
        for round_ in range(8):
            study = f"1.2.826.0.1.3680043.10.997.{round_}"
            with db.session() as session:
                ids = []
                for i in range(2):
                    row = Instance(sop_instance_uid=f"{study}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                   transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=study,
                                   series_instance_uid=f"{study}.1", path=f"{study}/{i}", sha256=f"{i:064x}", size=1,
                                   modality="CR", received_at=NOW)
                    session.add(row)
                    session.flush()
                    ids.append(row.id)
                refresh_study(session, study)
            barrier = threading.Barrier(2)

            def record(instance_id: int, total: int, study: str, barrier: threading.Barrier) -> None:
                with db.session() as session:
                    session.add(ScoreResult(instance_id=instance_id, study_instance_uid=study, status="scored",
                                            total_score=total, brixia_total=total, p_disease=0.5, zones_scored=6))
                    session.flush()
                    barrier.wait(timeout=10) if db.engine.dialect.name != "sqlite" else None
                    refresh_study(session, study)

            threads = [threading.Thread(target=record, args=(iid, total, study, barrier))
                       for iid, total in zip(ids, (2, 5))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            row = stored_rows(db)[study]
            assert row[4] == 0, "both results are in: nothing pending"
            assert row[5] == 5 * 1000.0 + 5 * 2.0 + 0.5, "the worse image of the two"
    finally:
        db.dispose()
