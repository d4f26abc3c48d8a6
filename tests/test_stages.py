"""Each stage of the node in-process, with a real database, real archive files and a real receiver.

The score stage gets the output the real pipeline produced for a phantom
once (the pipeline itself is tested elsewhere); its own archive writes,
catalog rows, send jobs and result rows are real, on SQLite and (with
CXRTRIAGE_TEST_DATABASE_URL) PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from cxrtriage.config import InferenceSettings, Peer
from cxrtriage.dicom_header import EncodedObject, catalog_attributes
from cxrtriage.inference.instance import InstanceScored, score_instance
from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.observability import Metrics
from cxrtriage.scp.contexts import Status
from cxrtriage.scp.ingest import Ingest
from cxrtriage.scp.sender import STORED_STATUSES
from cxrtriage.stages.lease_loop import LeaseLoop, Turn
from cxrtriage.stages.score import LocalScorer, ScoreStage
from cxrtriage.stages.send import SendStage
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.catalog import PATIENT_STUDY_COLUMNS
from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Instance, Job, JobKind, JobState, ResultStatus, ScoreResult, utcnow
from cxrtriage.storage.queue import Claimed, JobQueue

from .harness import RecordingSCP, StoreSCP, free_port

SEED = 2_400_000
DESTINATIONS = ("PACS", "ARCHIVE")


@pytest.fixture(scope="module")
def source_cr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    phantom = PhantomGenerator(448, 416)(SEED, affected_zones=(0, 4))
    return write_cr(phantom, tmp_path_factory.mktemp("source") / "cr.dcm", patient_id="STAGES-1")


@pytest.fixture(scope="module")
def scored(source_cr: Path, pipeline: Any) -> InstanceScored:
    """What the real scorer returns for the phantom, computed once."""
    uid = str(pydicom.dcmread(source_cr, stop_before_pixels=True).SOPInstanceUID)
    outcome = score_instance(pipeline, source_cr, uid)
    assert isinstance(outcome, InstanceScored)
    return outcome


@dataclasses.dataclass
class Env:
    db: Database
    archive: Archive
    queue: JobQueue
    metrics: Metrics
    ingest: Ingest

    def receive(self, path: Path) -> Instance:
        """Store ``path`` through the real C-STORE core; its score job is queued."""
        status = self.ingest.store(path.read_bytes(), ComputedRadiographyImageStorage, "MODALITY", None)
        assert status == Status.SUCCESS
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        with self.db.session() as s:
            return s.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()

    def count(self, model: Any, *where: Any) -> int:
        with self.db.session() as s:
            return s.scalar(select(func.count()).select_from(model).where(*where))

    def rows(self, model: Any, *where: Any) -> list[Any]:
        with self.db.session() as s:
            return list(s.scalars(select(model).where(*where)))

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def score_stage(self, scorer: Any) -> ScoreStage:
        return ScoreStage(self.db, self.archive, self.queue, self.metrics, scorer, destinations=DESTINATIONS,
                          ae_title="CXRTRIAGE", max_attempts=2)

    def loop(self, kind: JobKind, stage: Any, worker: str = "w", lease: float = 60, on_failed: Any = None) -> LeaseLoop:
        return LeaseLoop(self.queue, kind, stage, worker=worker, lease_seconds=lease, poll_seconds=0.05,
                         stopping=threading.Event(), on_failed=on_failed)


@pytest.fixture
def env(database: Database, tmp_path: Path) -> Env:
    archive = Archive(tmp_path / "archive")
    queue = JobQueue(database, backoff_base=0.2, backoff_cap=1.0)
    metrics = Metrics()
    return Env(database, archive, queue, metrics, Ingest(database, archive, queue, metrics, 0, max_attempts=2))


def returning(outcome: Any, calls: list[tuple] | None = None) -> Any:
    """A scorer that returns ``outcome``, noting what it was asked to score."""
    def scorer(path: Path, sop_instance_uid: str, overlay: Path | None) -> Any:
        if calls is not None:
            calls.append((path, sop_instance_uid, overlay))
        return outcome
    return scorer


# -- score stage ---------------------------------------------------------------


def test_score_stage_records_the_result_catalog_rows_and_one_send_per_destination(
    env: Env, source_cr: Path, scored: InstanceScored
) -> None:
    source = env.receive(source_cr)
    calls: list[tuple] = []
    assert env.loop(JobKind.SCORE, env.score_stage(returning(scored, calls))).turn() is Turn.DONE
    assert calls[0][:2] == (env.archive.path(source.path), source.sop_instance_uid)  # the archived source

    (result,) = env.rows(ScoreResult)
    assert (result.status, result.total_score, result.brixia_total) == (ResultStatus.SCORED, scored.total,
                                                                          scored.brixia_total)
    assert result.algorithm_version == scored.algorithm_version and result.p_disease == scored.p_disease
    derived = {row.kind: row for row in env.rows(Instance, Instance.derived_from_id == source.id)}
    assert set(derived) == {"seg", "sr"}
    assert (result.seg_instance_id, result.sr_instance_id) == (derived["seg"].id, derived["sr"].id)
    for obj in scored.objects:
        row = derived[obj.kind]
        stored = env.archive.path(row.path)
        assert stored.read_bytes() == obj.data and row.size == len(obj.data)  # durable, unchanged bytes
        # The row built from the scorer's facts and the source row is the row its header gives.
        header = catalog_attributes(pydicom.dcmread(stored, stop_before_pixels=True))
        assert {key: getattr(row, key) for key in header} == header
        assert all(getattr(row, c) == getattr(source, c) for c in PATIENT_STUDY_COLUMNS)
        assert row.calling_aet == "CXRTRIAGE"
    sends = env.rows(Job, Job.kind == JobKind.SEND)
    assert sorted((j.instance_id, j.destination) for j in sends) == sorted(
        (derived[k].id, d) for k in ("seg", "sr") for d in DESTINATIONS)
    assert all(j.state == JobState.PENDING and j.max_attempts == 2 for j in sends)
    (score_job,) = env.rows(Job, Job.kind == JobKind.SCORE)
    assert score_job.state == JobState.DONE
    assert env.metric("cxrtriage_scored_total", outcome="scored") == 1


def _refreshed(obj: EncodedObject) -> EncodedObject:
    """The same object (same UIDs) built again later: other bytes."""
    ds = pydicom.dcmread(io.BytesIO(obj.data))
    ds.ContentTime = "235959"
    return EncodedObject.encode(ds, obj.kind)


def test_score_stage_run_again_keeps_the_uids_refreshes_the_bytes_and_adds_no_rows(
    env: Env, source_cr: Path, scored: InstanceScored
) -> None:
    source = env.receive(source_cr)
    assert env.loop(JobKind.SCORE, env.score_stage(returning(scored))).turn() is Turn.DONE
    derived = env.rows(Instance, Instance.kind != "source")
    before = {row.kind: (row.id, row.sop_instance_uid, row.path) for row in derived}
    again = dataclasses.replace(scored, seg=_refreshed(scored.seg), sr=_refreshed(scored.sr), total=scored.total + 1)
    assert again.seg.data != scored.seg.data
    with env.db.session() as s:  # re-queued as an operator's re-score would
        s.get(Job, env.rows(Job, Job.kind == JobKind.SCORE)[0].id).state = JobState.PENDING

    assert env.loop(JobKind.SCORE, env.score_stage(returning(again))).turn() is Turn.DONE
    rows = {row.kind: row for row in env.rows(Instance, Instance.kind != "source")}
    assert {k: (r.id, r.sop_instance_uid, r.path) for k, r in rows.items()} == before  # same UIDs, same rows
    for obj in again.objects:
        assert env.archive.path(rows[obj.kind].path).read_bytes() == obj.data  # refreshed bytes
        assert (rows[obj.kind].size, len(rows[obj.kind].sha256)) == (len(obj.data), 64)
    assert env.count(Instance) == 3 and env.count(ScoreResult) == 1
    assert env.rows(ScoreResult)[0].total_score == scored.total + 1
    assert env.count(Job, Job.kind == JobKind.SEND) == 2 * len(DESTINATIONS)  # no duplicate send job
    assert not list(env.archive.tmp.iterdir())  # no temp file left behind
    assert source.id == rows["seg"].derived_from_id


def test_score_stage_stores_catalogs_and_sends_the_secondary_capture(
    env: Env, source_cr: Path, pipeline: Any
) -> None:
    """With results.secondary_capture the SC is a third derived object: archived, cataloged (kind sc), sent to
    every destination, and found by C-FIND like the SEG and SR."""
    from cxrtriage.scp.query import QueryEngine

    source = env.receive(source_cr)
    scorer = LocalScorer(InferenceSettings(), pipeline=pipeline, secondary_capture=True)
    assert env.loop(JobKind.SCORE, env.score_stage(scorer)).turn() is Turn.DONE
    derived = {row.kind: row for row in env.rows(Instance, Instance.derived_from_id == source.id)}
    assert set(derived) == {"seg", "sr", "sc"}
    sc = derived["sc"]
    header = pydicom.dcmread(env.archive.path(sc.path), stop_before_pixels=True)
    assert header.SOPInstanceUID == sc.sop_instance_uid and sc.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert (sc.modality, sc.series_number) == ("OT", 9903)
    assert sorted(j.destination for j in env.rows(Job, Job.kind == JobKind.SEND, Job.instance_id == sc.id)) == sorted(
        DESTINATIONS)
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = source.study_instance_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    engine = QueryEngine(env.db, env.archive, "CXRTRIAGE")
    found = {str(r.Modality) for r in engine.find(query, "STUDY")}
    assert found >= {"SEG", "SR", "OT"}


def test_score_stage_records_an_image_it_cannot_score(env: Env, tmp_path: Path, pipeline: Any) -> None:
    ds = pydicom.dcmread(write_cr(PhantomGenerator(448, 416)(SEED + 1), tmp_path / "lateral.dcm"))
    ds.ViewPosition = "LL"
    ds.save_as(tmp_path / "lateral.dcm", enforce_file_format=True)
    source = env.receive(tmp_path / "lateral.dcm")
    scorer = LocalScorer(InferenceSettings(), pipeline=pipeline)  # the real reader refuses it
    assert env.loop(JobKind.SCORE, env.score_stage(scorer)).turn() is Turn.DONE

    (result,) = env.rows(ScoreResult)
    assert (result.instance_id, result.status, result.reason) == (source.id, ResultStatus.NOT_SCORABLE, "lateral_view")
    assert "LL" in result.message and result.total_score is None
    assert env.count(Instance) == 1 and env.count(Job, Job.kind == JobKind.SEND) == 0
    assert env.rows(Job)[0].state == JobState.DONE
    assert env.metric("cxrtriage_scored_total", outcome="lateral_view") == 1


def test_score_stage_below_min_free_mb_writes_nothing_and_defers_the_job_until_space_returns(
    env: Env, source_cr: Path, scored: InstanceScored
) -> None:
    source = env.receive(source_cr)
    files_before = sorted(p for p in env.archive.root.rglob("*") if p.is_file())
    calls: list[tuple] = []
    # More than any disk has free: the floor is not met (filling a real disk is not needed to show it).
    short = ScoreStage(env.db, env.archive, env.queue, env.metrics, returning(scored, calls),
                       destinations=DESTINATIONS, ae_title="CXRTRIAGE", max_attempts=2, min_free_bytes=2**62)
    loop = env.loop(JobKind.SCORE, short)
    for _ in range(3):  # more times than max_attempts: a full disk never fails the job for good
        t0 = utcnow()
        assert loop.turn() is Turn.DONE  # the stage ran and deferred the job
        (job,) = env.rows(Job)
        assert (job.state, job.attempts) == (JobState.PENDING, 0)
        assert "below storage.min_free_mb" in job.last_error and "scoring deferred" in job.last_error
        # Claimable again after the backoff, not at once.
        assert (job.available_at.replace(tzinfo=dt.UTC) - t0).total_seconds() >= 0.15
        time.sleep(0.25)
    assert calls == []  # not scored: no SEG, SR or overlay written
    assert sorted(p for p in env.archive.root.rglob("*") if p.is_file()) == files_before
    assert not env.archive.overlay_path(source.sop_instance_uid).exists()
    assert env.count(ScoreResult) == 0 and env.count(Job, Job.kind == JobKind.SEND) == 0
    assert env.metric("cxrtriage_scored_total", outcome="deferred_disk_full") == 3
    # As the node runs it, the stage is also the claim gate: below the floor nothing is even claimed.
    gated = LeaseLoop(env.queue.gated(short), JobKind.SCORE, short, worker="g", lease_seconds=60, poll_seconds=0.05,
                      stopping=threading.Event())
    assert gated.turn() is Turn.IDLE
    assert env.rows(Job)[0].attempts == 0 and env.metric("cxrtriage_scored_total", outcome="deferred_disk_full") == 3

    space = ScoreStage(env.db, env.archive, env.queue, env.metrics, returning(scored, calls),
                       destinations=DESTINATIONS, ae_title="CXRTRIAGE", max_attempts=2, min_free_bytes=2**20)
    assert env.loop(JobKind.SCORE, space).turn() is Turn.DONE  # space is back: scored on its first attempt
    (job,) = env.rows(Job, Job.kind == JobKind.SCORE)
    assert (job.state, job.attempts) == (JobState.DONE, 1) and len(calls) == 1
    assert env.rows(ScoreResult)[0].status == ResultStatus.SCORED
    assert env.count(Job, Job.kind == JobKind.SEND) == 2 * len(DESTINATIONS)


# -- lease loop ----------------------------------------------------------------


def test_lease_loop_retries_a_failing_job_with_backoff_then_fails_it_for_good(env: Env, source_cr: Path) -> None:
    source = env.receive(source_cr)

    def broken(*_: Any) -> Any:
        raise RuntimeError("model file unreadable")

    stage = env.score_stage(broken)
    loop = env.loop(JobKind.SCORE, stage, on_failed=stage.record_failed)
    t0 = utcnow()
    assert loop.turn() is Turn.RETRYING
    (job,) = env.rows(Job)
    assert (job.state, job.attempts, job.last_error) == (JobState.PENDING, 1, "RuntimeError: model file unreadable")
    waits = (job.available_at.replace(tzinfo=dt.UTC) - t0).total_seconds()
    assert 0.15 < waits < 1.0  # the first backoff: backoff_base
    assert loop.turn() is Turn.IDLE  # backing off: not claimable yet
    assert env.count(ScoreResult) == 0  # not recorded while it may still succeed

    time.sleep(0.25)
    assert loop.turn() is Turn.FAILED  # attempt 2 of 2
    (job,) = env.rows(Job)
    assert (job.state, job.attempts) == (JobState.FAILED, 2) and job.finished_at is not None
    (result,) = env.rows(ScoreResult)
    assert (result.instance_id, result.status, result.reason, result.message) == (
        source.id, ResultStatus.FAILED, "pipeline_error", "model file unreadable")
    assert loop.turn() is Turn.IDLE
    assert env.metric("cxrtriage_scored_total", outcome="pipeline_error") == 1


def test_lease_loop_discards_a_result_whose_lease_was_lost(env: Env, source_cr: Path, scored: InstanceScored) -> None:
    env.receive(source_cr)
    taken_over: list[Claimed] = []

    def slow(*_: Any) -> InstanceScored:
        time.sleep(0.15)  # longer than the lease: another worker takes the job over
        job = env.queue.claim(JobKind.SCORE, "other", 60)
        assert job is not None
        taken_over.append(job)
        return scored

    stage = env.score_stage(slow)
    assert env.loop(JobKind.SCORE, stage, worker="slow", lease=0.05).turn() is Turn.LEASE_LOST
    assert env.count(ScoreResult) == 0 and env.count(Instance) == 1  # rolled back: no result, no catalog rows
    assert env.count(Job, Job.kind == JobKind.SEND) == 0
    (job,) = env.rows(Job)
    assert (job.state, job.worker, job.attempts) == (JobState.RUNNING, "other", 2)  # the other worker's, untouched

    source = env.rows(Instance)[0]
    stage.record_scored(taken_over[0], "other", source, scored)  # the other worker's result stands
    assert env.rows(ScoreResult)[0].status == ResultStatus.SCORED and env.count(Instance) == 3


# -- send stage ----------------------------------------------------------------


def _dataset_bytes(path: Path) -> bytes:
    """A DICOM file's dataset as encoded on disk (after preamble and File Meta)."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


@pytest.fixture
def stored(env: Env, source_cr: Path, scored: InstanceScored) -> list[Instance]:
    """The phantom received and scored: its SEG and SR in the archive, their send jobs queued."""
    env.receive(source_cr)
    assert env.loop(JobKind.SCORE, env.score_stage(returning(scored))).turn() is Turn.DONE
    return sorted(env.rows(Instance, Instance.kind != "source"), key=lambda row: row.kind)


def _never_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the send stage decoded a stored file")

    import pynetdicom.association

    monkeypatch.setattr(pydicom, "dcmread", refuse)
    monkeypatch.setattr(pynetdicom.association, "dcmread", refuse)


def _peers(port: int) -> dict[str, Peer]:
    return {name: Peer(ae_title=name, host="127.0.0.1", port=port) for name in DESTINATIONS}


def _received_dataset(data: bytes) -> pydicom.Dataset:
    from pynetdicom.dsutils import decode

    return decode(io.BytesIO(data), False, True)  # both objects are Explicit VR Little Endian


def test_send_stage_sends_the_stored_bytes_unchanged(
    env: Env, stored: list[Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    pacs = RecordingSCP("PACS").start()
    try:
        stage = SendStage(env.db, env.archive, env.queue, env.metrics, _peers(pacs.port), ae_title="CXRTRIAGE",
                          timeout=10)
        loop = env.loop(JobKind.SEND, stage)
        _never_decode(monkeypatch)
        assert [loop.turn() for _ in range(4)] == [Turn.DONE] * 4
        monkeypatch.undo()
    finally:
        pacs.stop()
    assert len(pacs.received) == 4  # SEG and SR, to both destinations
    by_uid = {str(_received_dataset(data).SOPInstanceUID): (syntax, data) for syntax, data in pacs.received}
    for row in stored:
        path = env.archive.path(row.path)
        syntax, received = by_uid[row.sop_instance_uid]
        assert syntax == row.transfer_syntax_uid  # proposed and sent in its own transfer syntax
        assert received == _dataset_bytes(path)  # byte for byte, not re-encoded
        archived = pydicom.dcmread(path)
        again = _received_dataset(received)
        again.file_meta = archived.file_meta
        assert again == archived
    assert env.count(Job, Job.kind == JobKind.SEND, Job.state == JobState.DONE) == 4
    assert env.metric("cxrtriage_sent_total", destination="PACS", outcome="sent") == 2
    assert env.metric("cxrtriage_stage_seconds_count", stage="send") == 4


def test_send_stage_gives_up_on_a_destination_no_longer_configured(env: Env, stored: list[Instance]) -> None:
    stage = SendStage(env.db, env.archive, env.queue, env.metrics, {}, ae_title="CXRTRIAGE", timeout=10)
    assert [env.loop(JobKind.SEND, stage).turn() for _ in range(4)] == [Turn.FAILED] * 4  # no retry
    assert {(j.state, j.attempts) for j in env.rows(Job, Job.kind == JobKind.SEND)} == {(JobState.FAILED, 1)}
    assert {j.last_error for j in env.rows(Job, Job.destination == "ARCHIVE")} == {
        "GiveUp: destination 'ARCHIVE' is no longer configured"}


def test_send_stage_files_arrive_bit_preserved_at_dcmtk_storescp(
    env: Env, stored: list[Instance], tmp_path: Path
) -> None:
    pacs = StoreSCP(tmp_path / "pacs", "PACS").start()  # +B: written exactly as received
    try:
        stage = SendStage(env.db, env.archive, env.queue, env.metrics, _peers(pacs.port), ae_title="CXRTRIAGE",
                          timeout=10)
        loop = env.loop(JobKind.SEND, stage)
        assert [loop.turn() for _ in range(4)] == [Turn.DONE] * 4
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in pacs.received()}
    finally:
        pacs.stop()
    for row in stored:
        assert _dataset_bytes(received[row.sop_instance_uid]) == _dataset_bytes(env.archive.path(row.path))


@pytest.mark.parametrize("answer", [Status.OUT_OF_RESOURCES, Status.CANNOT_UNDERSTAND])
def test_send_stage_fails_the_job_with_the_status_when_refused(env: Env, stored: list[Instance], answer: int) -> None:
    pacs = RecordingSCP("PACS", status=answer).start()
    try:
        stage = SendStage(env.db, env.archive, env.queue, env.metrics,
                          {"PACS": Peer(ae_title="PACS", host="127.0.0.1", port=pacs.port)},
                          ae_title="CXRTRIAGE", timeout=10)
        assert env.loop(JobKind.SEND, stage).turn() is Turn.RETRYING  # the first job: the SEG to PACS
    finally:
        pacs.stop()
    (job,) = env.rows(Job, Job.destination == "PACS", Job.attempts == 1)
    label = f"0x{answer:04X}"
    assert job.state == JobState.PENDING and job.last_error == f"RefusedError: PACS answered C-STORE status {label}"
    assert env.metric("cxrtriage_sent_total", destination="PACS", outcome=label) == 1
    assert env.metric("cxrtriage_sent_total", destination="PACS", outcome="sent") == 0


def test_send_stage_counts_storage_warnings_as_stored_and_retries_an_unreachable_peer(
    env: Env, stored: list[Instance]
) -> None:
    assert STORED_STATUSES == {0x0000, 0xB000, 0xB006, 0xB007}  # success and the Storage Service's warnings
    pacs = RecordingSCP("PACS", status=0xB000).start()  # coercion of data elements
    peers = {"PACS": Peer(ae_title="PACS", host="127.0.0.1", port=pacs.port),
             "ARCHIVE": Peer(ae_title="ARCHIVE", host="127.0.0.1", port=free_port())}  # nobody listens
    try:
        stage = SendStage(env.db, env.archive, env.queue, env.metrics, peers, ae_title="CXRTRIAGE", timeout=5)
        turns = [env.loop(JobKind.SEND, stage).turn() for _ in range(4)]
    finally:
        pacs.stop()
    assert sorted(turns) == sorted([Turn.DONE, Turn.DONE, Turn.RETRYING, Turn.RETRYING])
    assert env.count(Job, Job.destination == "PACS", Job.state == JobState.DONE) == 2
    archive_jobs = env.rows(Job, Job.destination == "ARCHIVE")
    assert all(j.state == JobState.PENDING and "association with ARCHIVE" in j.last_error for j in archive_jobs)
    assert env.metric("cxrtriage_sent_total", destination="ARCHIVE", outcome="unreachable") == 2


def test_an_unreachable_destination_opens_its_circuit_and_its_jobs_keep_their_attempts(
    env: Env, stored: list[Instance]
) -> None:
    from cxrtriage.stages.circuit import Circuits, CircuitState

    now = [0.0]
    circuits = Circuits(["ARCHIVE"], 2, 30, clock=lambda: now[0])
    circuit = circuits["ARCHIVE"]
    peers = {"ARCHIVE": Peer(ae_title="ARCHIVE", host="127.0.0.1", port=free_port())}  # nobody listens
    stage = SendStage(env.db, env.archive, env.queue, env.metrics, peers, ae_title="CXRTRIAGE", timeout=5,
                      connect_timeout=5, circuits=circuits)
    queue = env.queue.for_destination("ARCHIVE", gate=circuit)  # what the node's ARCHIVE workers see
    loop = LeaseLoop(queue, JobKind.SEND, stage, worker="w", lease_seconds=60, poll_seconds=0.05,
                     stopping=threading.Event())
    assert loop.turn() is Turn.RETRYING  # the first failure: an ordinary retry, its attempt spent
    assert loop.turn() is Turn.DONE  # the second opens the circuit: the job is deferred, not failed
    assert circuit.state is CircuitState.OPEN
    jobs = {j.id: j for j in env.rows(Job, Job.destination == "ARCHIVE")}
    assert sorted(j.attempts for j in jobs.values()) == [0, 1] and {j.state for j in jobs.values()} == {
        JobState.PENDING}
    assert any("circuit open: retried in 30 s" in j.last_error for j in jobs.values())
    time.sleep(0.25)  # the first job's backoff is over, but the circuit is open: nothing is claimed
    assert loop.turn() is Turn.IDLE
    assert all(j.attempts == 0 and j.state == JobState.PENDING for j in env.rows(Job, Job.destination == "PACS"))

    now[0] += 30  # half-open: one trial, which fails and opens the circuit again, its attempt not spent
    assert loop.turn() is Turn.DONE and circuit.state is CircuitState.OPEN
    assert sorted(j.attempts for j in env.rows(Job, Job.destination == "ARCHIVE")) == [0, 1]
    assert env.count(Job, Job.state == JobState.FAILED) == 0
    assert circuits.states()[0]["consecutive_failures"] == 3


def test_a_compressed_seg_reaches_a_pacs_that_takes_only_uncompressed(
    tmp_path: Path, source_cr: Path, pipeline: Any
) -> None:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from cxrtriage.inference.dicom_results import build_result_objects
    from cxrtriage.inference.radiograph import load_radiograph
    from cxrtriage.scp.sender import send_files

    radiograph = load_radiograph(source_cr)
    seg_path, _ = build_result_objects(radiograph.dataset, pipeline(radiograph), jpeg2000=True).save(tmp_path)
    assert pydicom.dcmread(seg_path).file_meta.TransferSyntaxUID == JPEG2000Lossless
    pacs = RecordingSCP("PACS", transfer_syntaxes=(ExplicitVRLittleEndian,)).start()
    try:
        assert send_files(_peers(pacs.port)["PACS"], [seg_path], "CXRTRIAGE", timeout=10) == [0x0000]
    finally:
        pacs.stop()
    (syntax, data), = pacs.received
    assert syntax == ExplicitVRLittleEndian  # decoded for this peer, the same segmentation
    received = _received_dataset(data)
    received.file_meta = pydicom.dataset.FileMetaDataset()
    received.file_meta.TransferSyntaxUID = syntax
    original = pydicom.dcmread(seg_path)
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert (received.pixel_array == original.pixel_array).all()


def test_a_refused_object_keeps_the_circuit_closed_and_spends_its_attempts(env: Env, stored: list[Instance]) -> None:
    """A status answer means the destination is up: the object fails the ordinary way, never as a trial
    that reopens the circuit forever with its attempt handed back."""
    from cxrtriage.stages.circuit import Circuits, CircuitState

    circuits = Circuits(["PACS"], 1, 30)  # one failure would open it
    pacs = RecordingSCP("PACS", status=Status.OUT_OF_RESOURCES).start()
    try:
        stage = SendStage(env.db, env.archive, env.queue, env.metrics,
                          {"PACS": Peer(ae_title="PACS", host="127.0.0.1", port=pacs.port)},
                          ae_title="CXRTRIAGE", timeout=10, connect_timeout=5, circuits=circuits)
        loop = LeaseLoop(env.queue.for_destination("PACS", gate=circuits["PACS"]), JobKind.SEND, stage, worker="w",
                         lease_seconds=60, poll_seconds=0.05, stopping=threading.Event())
        assert [loop.turn(), loop.turn()] == [Turn.RETRYING, Turn.RETRYING]
    finally:
        pacs.stop()
    assert circuits["PACS"].state is CircuitState.CLOSED
    assert sorted(j.attempts for j in env.rows(Job, Job.destination == "PACS")) == [1, 1]
