"""No patient data in logs, job errors, result messages or metrics, whatever fails.

Images carry marker values (name, ID, accession number, birth date) and are
driven through every error path a test can trigger on the real node over real
SQLite: the database refusing a store, a scoring job failing, sends failing
(nobody listening at the PACS), and escalation (its webhook unreachable).
Then the log, the database's error columns and the /metrics text are searched
for the markers. The database refusals are triggers: SQLite itself refuses the
write, and the driver's error is what the node must not leak (SQLAlchemy's
text quotes the statement's bound values).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.observability import safe_error
from cxrtriage.storage.models import Job, JobKind, JobState, ScoreResult

from .harness import NodeProcess, free_port, wait_for
from .tools import require

pytestmark = pytest.mark.slow

MARKERS = {"PatientName": "ZZMARKER^NAME", "PatientID": "ZZMARKERID", "AccessionNumber": "ZZMARKACC",
           "PatientBirthDate": "19010101"}
#: What must appear nowhere: the values and the name's components on their own.
FORBIDDEN = ("ZZMARK", "19010101")


def _marked(path: Path, seed: int) -> Path:
    write_cr(PhantomGenerator(448, 416)(seed), path)
    ds = pydicom.dcmread(path)
    for keyword, value in MARKERS.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def _store(port: int, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([require("storescu", "dcmtk"), "-v", "-aec", "CXRTRIAGE", "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=120)


def _sql(db_path: Path, statement: str) -> None:
    with sqlite3.connect(db_path, timeout=60) as conn:
        conn.execute(statement)


def _count(node: NodeProcess, *where: object) -> int:
    db = node.db()
    try:
        with db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(*where)) or 0)
    finally:
        db.dispose()


def _leaks(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(marker in line for marker in FORBIDDEN)]


def test_safe_error_drops_bound_parameters_and_dataset_values() -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine("sqlite://")  # without hide_parameters: safe_error must not rely on it
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE p (name TEXT UNIQUE, id TEXT)"))
        conn.execute(text("INSERT INTO p VALUES (:n, :i)"), {"n": "ZZMARKER^NAME", "i": "ZZMARKERID"})
        with pytest.raises(Exception) as caught:
            conn.execute(text("INSERT INTO p VALUES (:n, :i)"), {"n": "ZZMARKER^NAME", "i": "ZZMARKERID"})
    assert "ZZMARKERID" in str(caught.value)  # what the node used to log
    assert safe_error(caught.value) == "IntegrityError: UNIQUE constraint failed: p.name"
    assert safe_error(KeyError("ZZMARKERID")) == "KeyError: <redacted>"
    message = safe_error(ValueError("PatientID=ZZMARKERID name ZZMARKER^NAME born 19010101 in 1.2.19010101.3"))
    assert "ZZMARK" not in message and " 19010101" not in message
    assert "1.2.19010101.3" in message  # UIDs are not patient data and help find the image
    assert len(safe_error(RuntimeError("x" * 10_000))) < 400


def test_no_patient_data_on_any_error_path(tmp_path: Path) -> None:
    webhook = f"http://127.0.0.1:{free_port()}/escalate"  # nobody listens: escalation fails every run
    bands = ("critical", "high", "moderate", "low", "unscored", "ai_failed")
    db_path = tmp_path / "node.db"
    node = NodeProcess(
        tmp_path / "node", f"sqlite:///{db_path}",
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],  # nobody listens
        workers={"max_attempts": 2},
        triage={"escalation": {"deadline_minutes": {band: 0 for band in bands}, "webhook_url": webhook,
                               "webhook_timeout_seconds": 1, "interval_seconds": 1}},
    ).start()
    try:
        scored = _marked(tmp_path / "scored.dcm", 2_400_000)
        assert _store(node.port, scored).returncode == 0
        wait_for(lambda: _count(node, Job.kind == JobKind.SEND) > 0, 300, "the first image scored, sends queued")

        # Scoring fails: the database refuses the send jobs the scoring transaction queues.
        _sql(db_path, "CREATE TRIGGER refuse_sends BEFORE INSERT ON jobs WHEN NEW.kind = 'send' "
                      "BEGIN SELECT RAISE(ABORT, 'no sends now'); END")
        assert _store(node.port, _marked(tmp_path / "unscorable.dcm", 2_400_001)).returncode == 0
        wait_for(lambda: _count(node, Job.kind == JobKind.SCORE, Job.state == JobState.FAILED) > 0, 300,
                 "a scoring job failed for good")

        # Storing fails: the database refuses the instance row.
        _sql(db_path, "CREATE TRIGGER refuse_instances BEFORE INSERT ON instances "
                      "BEGIN SELECT RAISE(ABORT, 'no instances now'); END")
        refused = _store(node.port, _marked(tmp_path / "refused.dcm", 2_400_002))
        assert "Success" not in refused.stderr or refused.returncode != 0, refused.stderr
        _sql(db_path, "DROP TRIGGER refuse_instances")
        _sql(db_path, "DROP TRIGGER refuse_sends")

        wait_for(lambda: _count(node, Job.kind == JobKind.SEND, Job.last_error != "") > 0, 120, "a failed send")
        wait_for(lambda: "escalation webhook failed" in node.log, 60, "a failed escalation")
        log = node.log + (tmp_path / "node" / "stdout.log").read_text()
        url = re.search(r'"msg": "metrics", "url": "([^"]+)"', node.log)
        assert url
        metrics = urllib.request.urlopen(url.group(1), timeout=30).read().decode()
    finally:
        node.stop()

    # Every error path ran, and each says why.
    assert '"store failed"' in log
    assert "score job failed" in log and "send job failed" in log
    db = node.db()
    try:
        with db.session() as s:
            errors = [e for e in s.scalars(select(Job.last_error)) if e]
            results = [(r.reason, r.message) for r in s.scalars(select(ScoreResult))]
    finally:
        db.dispose()
    assert any("no sends now" in e for e in errors)  # the database's reason survives the scrubbing
    assert any("PACS" in e for e in errors)
    # ... and nothing names the patient.
    assert _leaks(log) == []
    assert [e for e in errors if _leaks(e)] == []
    assert [r for r in results if _leaks(" ".join(r))] == []
    assert _leaks(metrics) == []
