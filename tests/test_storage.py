"""Archive and durable queue, on SQLite and (with CXRTRIAGE_TEST_DATABASE_URL) PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from cxrtriage.storage.archive import Archive, InvalidUIDError, check_uid, is_valid_uid
from cxrtriage.storage.models import Instance, Job, JobKind, JobState
from cxrtriage.storage.queue import JobQueue, backoff_seconds

PENDING, DONE, FAILED = JobState.PENDING, JobState.DONE, JobState.FAILED
SCORE, SEND = JobKind.SCORE, JobKind.SEND


def add_instance(db, n: int) -> int:
    with db.session() as s:
        inst = Instance(
            sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            study_instance_uid="1.2.3", series_instance_uid="1.2.3.0", path=f"x/{n}.dcm", sha256=f"{n:064d}", size=1,
        )
        s.add(inst)
        s.flush()
        return inst.id


@pytest.mark.parametrize(
    "uid",
    ["", "../../etc/passwd", "1.2/../../3", "1.2.840\\..\\x", "1.02.3", "1..2", ".1.2", "1.2.", "1.2.3 4", "a.b.c", "1" * 65],
)
def test_invalid_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    archive = Archive(tmp_path)
    with pytest.raises(InvalidUIDError):
        archive.relative_path("1.2.3", uid or "", "1.2.3.4")
    with pytest.raises(InvalidUIDError):
        archive.relative_path(uid, "1.2.3", "1.2.3.4")
    assert not is_valid_uid(uid)  # the check the rest of the node uses is the same one


def test_job_kinds_states_and_statuses_are_stored_as_before() -> None:
    from cxrtriage.storage.models import ResultStatus

    assert [k.value for k in JobKind] == ["score", "send"]
    assert [s.value for s in JobState] == ["pending", "running", "done", "failed"]
    assert [s.value for s in ResultStatus] == ["scored", "not_scorable", "failed"]
    assert JobState.DONE == "done" and f"{JobKind.SEND} job failed" == "send job failed"


def test_archive_writes_durably_and_quarantines(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "a")
    rel = archive.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    sha, size = archive.write(rel, b"DICM-bytes")
    assert archive.read(rel) == b"DICM-bytes" and size == 10 and len(sha) == 64
    assert check_uid("1.2.840.10008.1.2\x00", "x") == "1.2.840.10008.1.2"  # UI padding
    assert archive.write(rel, b"other", sha256="given") == ("given", 5)  # a digest the caller has is not recomputed
    q = archive.quarantine(b"junk", "unreadable", "cannot parse", "MODALITY")
    assert q.read_bytes() == b"junk" and "cannot parse" in q.with_suffix(".json").read_text()
    assert q.parent == archive.quarantine_dir
    assert not list(archive.tmp.iterdir())  # no temp files left behind


def test_enqueue_is_idempotent_and_claims_by_priority(database) -> None:
    queue = JobQueue(database)
    ids = [add_instance(database, n) for n in range(3)]
    with database.session() as s:
        queue.enqueue(s, SCORE, ids[0])
        queue.enqueue(s, SCORE, ids[0])  # same job again: kept once
        queue.enqueue(s, SCORE, ids[1], priority=10)
        queue.enqueue(s, SEND, ids[2], "PACS")
    assert queue.depth()[(SCORE, PENDING)] == 2
    first = queue.claim(SCORE, "w1", 60)
    assert first.instance_id == ids[1]  # higher priority first
    second = queue.claim(SCORE, "w1", 60)
    assert second.instance_id == ids[0]
    assert queue.claim(SCORE, "w1", 60) is None
    with database.session() as s:
        assert queue.complete(s, first, "w1")
    assert queue.depth()[(SCORE, DONE)] == 1


def test_concurrent_workers_claim_each_job_exactly_once(database) -> None:
    queue = JobQueue(database)
    with database.session() as s:
        for n in range(120):
            s.add(Instance(sop_instance_uid=f"1.9.{n}", sop_class_uid="1", transfer_syntax_uid="1", study_instance_uid="1",
                           series_instance_uid="1", path="p", sha256=str(n), size=1))
    with database.session() as s:
        for inst_id in s.scalars(select(Instance.id)).all():
            queue.enqueue(s, SCORE, inst_id)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := queue.claim(SCORE, name, 60)) is not None:
            with database.session() as s:
                assert queue.complete(s, job, name)
            with lock:
                claimed.append(job.instance_id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 120
    assert queue.depth() == {(SCORE, DONE): 120}


def test_expired_lease_is_reclaimed_and_stale_worker_cannot_complete(database) -> None:
    queue = JobQueue(database)
    with database.session() as s:
        queue.enqueue(s, SCORE, add_instance(database, 1))
    job = queue.claim(SCORE, "crashed", lease_seconds=0.05)
    assert queue.claim(SCORE, "other", 60) is None  # lease still held
    time.sleep(0.1)
    again = queue.claim(SCORE, "other", 60)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert queue.fail(job, "crashed", "late failure") is None  # lost its lease: the failure changes nothing
    with database.session() as s:
        assert not queue.complete(s, job, "crashed")  # lost its lease
        assert queue.complete(s, again, "other")
        assert s.get(Job, job.id).last_error == ""


def test_failures_back_off_then_fail_for_good(database) -> None:
    queue = JobQueue(database, backoff_base=0.2, backoff_cap=1.0)
    with database.session() as s:
        queue.enqueue(s, SEND, add_instance(database, 1), "PACS", max_attempts=2)
    job = queue.claim(SEND, "w", 60)
    assert queue.fail(job, "w", "association refused") == PENDING
    assert queue.claim(SEND, "w", 60) is None  # backing off
    time.sleep(0.25)
    job = queue.claim(SEND, "w", 60)
    assert job.attempts == 2
    assert queue.fail(job, "w", "association refused") == FAILED
    with database.session() as s:
        row = s.get(Job, job.id)
        assert row.state == FAILED and row.last_error == "association refused"
    assert queue.retry_failed(SEND) == 1
    assert queue.claim(SEND, "w", 60) is not None
    assert [backoff_seconds(n, 5, 600) for n in (1, 2, 3, 10)] == [5, 10, 20, 600]


def test_restart_releases_own_dead_leases(database) -> None:
    queue = JobQueue(database)
    with database.session() as s:
        queue.enqueue(s, SCORE, add_instance(database, 1))
    queue.claim(SCORE, "node-a:111:score-0", 3600)
    assert queue.release_worker("node-a:", keep="node-a:222") == 1
    assert queue.claim(SCORE, "node-a:222:score-0", 60) is not None


def test_migration_0003_fills_zones_scored_from_the_stored_results(database_url: str) -> None:
    import json

    from sqlalchemy import insert, text

    from cxrtriage.storage.db import Database
    from cxrtriage.storage.models import Instance

    db = Database(database_url)
    try:
        db.migrate("0002")
        with db.engine.begin() as conn:
            for i in (1, 2, 3):
                conn.execute(insert(Instance).values(
                    id=i, sop_instance_uid=f"1.2.{i}", sop_class_uid="1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                    study_instance_uid="1.2.9", series_instance_uid="1.2.8", path=f"p{i}", sha256="x", size=1,
                    kind="source"))
            for instance, status, details in ((1, "scored", {"total_score": 2}), (2, "scored", {"zones_scored": 3}),
                                              (3, "failed", {})):
                conn.execute(text("INSERT INTO results (instance_id, study_instance_uid, status, reason, message, "
                                  "details, algorithm_version, created_at) VALUES (:i, '1.2.9', :s, '', '', :d, '', "
                                  "CURRENT_TIMESTAMP)"), {"i": instance, "s": status, "d": json.dumps(details)})
        db.migrate()
        with db.engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT instance_id, zones_scored FROM results")).all())
        assert rows == {1: 6, 2: 3, 3: None}  # older records: six zones; one lung: three; unscored: none
    finally:
        db.dispose()


def test_keep_never_replaces_a_file(tmp_path: Path) -> None:
    import hashlib

    from cxrtriage.storage.archive import ArchiveConflictError

    archive = Archive(tmp_path / "a")
    rel = archive.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5", "abc")
    sha = hashlib.sha256(b"first").hexdigest()
    assert archive.keep(rel, b"first", sha) is True
    assert archive.keep(rel, b"first", sha) is False  # the same bytes again: nothing written
    with pytest.raises(ArchiveConflictError):
        archive.keep(rel, b"other", hashlib.sha256(b"other").hexdigest())
    assert archive.read(rel) == b"first"
    assert not list(archive.tmp.iterdir())


def test_partial_writes_of_dead_writers_are_cleaned_when_the_archive_opens(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = tmp_path / "a"
    (root / ".tmp").mkdir(parents=True)
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
    dead = root / ".tmp" / f"1.2.3.dcm.{dead_pid}.deadbeef.part"  # kill -9 mid-write
    live = root / ".tmp" / f"1.2.4.dcm.{os.getppid()}.livebeef.part"  # another live process writing now
    stale = root / ".tmp" / f"1.2.5.dcm.{os.getppid()}.oldbeef0.part"  # live PID, but far too old: PID reused
    other = root / ".tmp" / "warm-up.dcm"  # not a partial write: not ours to judge
    from cxrtriage.storage.archive import HOST

    dead_here = root / ".tmp" / f"1.2.6.dcm.{dead_pid}@{HOST}.deadbee2.part"
    elsewhere = root / ".tmp" / f"1.2.7.dcm.{dead_pid}@node_b_example_org.livebee2.part"  # another host's PID
    stale_elsewhere = root / ".tmp" / f"1.2.8.dcm.{dead_pid}@node_b_example_org.oldbee20.part"
    for path in (dead, live, stale, other, dead_here, elsewhere, stale_elsewhere):
        path.write_bytes(b"partial")
    for path in (stale, stale_elsewhere):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    archive = Archive(root)
    assert not dead.exists() and not stale.exists() and not dead_here.exists() and not stale_elsewhere.exists()
    assert live.exists() and other.exists() and elsewhere.exists()
    assert archive.clean_tmp() == 0
