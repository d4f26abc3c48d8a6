"""The worklist, C-FIND, C-GET and UPS over one database, without a node process.

Every test runs on SQLite and, with CXRTRIAGE_TEST_DATABASE_URL set, on PostgreSQL:
C-FIND matching is SQL now, and the two databases differ exactly where it matters
(LIKE is case-insensitive on SQLite, case-sensitive on PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from cxrtriage.config import PrioritySettings
from cxrtriage.inference.result_model import ImageResult, ModelIdentityRecord, StageModelRecord, ZoneResult
from cxrtriage.inference.scoring import ZONE_NAMES
from cxrtriage.scp.query import QueryEngine, make_handlers, matches, workitems
from cxrtriage.storage.archive import Archive
from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Instance, Reading, ScoreResult
from cxrtriage.triage.study_rank import refresh_study
from cxrtriage.triage.worklist import StudyNotFound, Worklist

CR = "1.2.840.10008.5.1.4.1.1.1"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)
_uids = itertools.count(1)


def uid(prefix: str = "1.2.826.0.1.3680043.10.1") -> str:
    return f"{prefix}.{next(_uids)}"


def record(total: int, brixia: int, p: float, *, missing: tuple[str, ...] = (), research_use: bool = True) -> str:
    """The JSON an image's result is stored as: one lung's zones unscored when it is ``missing``."""
    zones = {}
    for k, name in enumerate(ZONE_NAMES):
        lung = "right" if k < 3 else "left"
        scored = lung not in missing
        zones[name] = ZoneResult(brixia_zone="ABCDEF"[k], scored=scored, binary_score=int(k < total) if scored else None,
                                 brixia_grade=min(3, brixia // 6) if scored else None)
    stage = StageModelRecord(name="bundled-lungs", version="1", origin="bundled", training_data=["synthetic"])
    identity = ModelIdentityRecord(research_use=research_use, lungs=stage, disease=stage.model_copy(update={"name": "bundled-disease"}))
    return ImageResult(total_score=total, brixia_total=brixia, p_disease=p, zones_scored=6 - 3 * len(missing),
                       missing_lungs=list(missing), zones=zones, model_identity=identity,
                       research_use=research_use).model_dump_json()


class Studies:
    """Writes instances, results and reading states straight into the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def image(self, study: str, *, result: tuple[int, int, float] | str | None = None, missing: tuple[str, ...] = (),
              received: dt.datetime = T0, kind: str = "source", sop_class: str = CR, path: str = "x.dcm",
              transfer_syntax: str = "1.2.840.10008.1.2.1", **columns: Any) -> Instance:
        sop = columns.pop("sop_instance_uid", None) or uid()
        with self.db.session() as session:
            row = Instance(sop_instance_uid=sop, sop_class_uid=sop_class, transfer_syntax_uid=transfer_syntax,
                           study_instance_uid=study, series_instance_uid=columns.pop("series", study + ".1"),
                           path=path, sha256=hashlib.sha256(sop.encode()).hexdigest(), size=1, kind=kind,
                           received_at=received, **{"modality": "CR", **columns})
            session.add(row)
            session.flush()
            if isinstance(result, tuple):
                total, brixia, p = result
                session.add(ScoreResult(instance_id=row.id, study_instance_uid=study, status="scored", total_score=total,
                                        brixia_total=brixia, p_disease=p, details=record(total, brixia, p, missing=missing),
                                        zones_scored=6 - 3 * len(missing)))
            elif isinstance(result, str):
                session.add(ScoreResult(instance_id=row.id, study_instance_uid=study, status=result, reason="lateral_view"))
            session.flush()
            refresh_study(session, study)  # as the node's writers do (ingest, score stage)
        return row

    def state(self, study: str, state: str, reader: str = "dr_a") -> None:
        with self.db.session() as session:
            session.add(Reading(study_instance_uid=study, state=state, reader=reader))


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def studies(db: Database) -> Studies:
    return Studies(db)


def engine(db: Database, tmp_path: Path) -> QueryEngine:
    return QueryEngine(db, Archive(tmp_path / "archive"), "CXRTRIAGE", Worklist(db))


def identifier(level: str = "STUDY", **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def found(qe: QueryEngine, level: str = "STUDY", model: str = "STUDY", **keys: Any) -> list[str]:
    key = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}[level]
    keys.setdefault(key, "")
    return sorted(str(r.get(key)) for r in qe.find(identifier(level, **keys), model))


def severity_query(study: str) -> Dataset:
    ds = identifier(StudyInstanceUID=study, StudyComments="")
    ds.add_new(0x00990010, "LO", "")
    return ds


# -- one severity rule ----------------------------------------------------


def test_a_study_answers_with_one_images_values_not_a_per_field_maximum(db: Database, studies: Studies,
                                                                         tmp_path: Path) -> None:
    """Image 1: zone score 4, P 0.60; image 2: zone score 2, P 0.99. The old per-field
    maximum answered "4/6 ... P(disease) 0.99", a study no image showed."""
    study = uid()
    first = studies.image(study, result=(4, 8, 0.60), received=T0)
    studies.image(study, result=(2, 4, 0.99), received=T0 + dt.timedelta(minutes=1))
    qe = engine(db, tmp_path)

    response = next(qe.find(severity_query(study), "STUDY"))
    assert "zone score 4/6, Brixia-style 8/18, P(disease) 0.60" in response.StudyComments
    assert "worklist high" in response.StudyComments
    block = response.private_block(0x0099, "CXRTRIAGE")
    assert (int(block[0x01].value), int(block[0x02].value), float(block[0x03].value)) == (4, 8, 0.6)
    assert block[0x06].value == "HIGH"

    entry = Worklist(db).entries(now=T0)[0]  # the worklist shows the same image
    assert (entry.total_score, entry.brixia_total, entry.p_disease) == (4, 8, 0.60)
    assert entry.worst_sop_instance_uid == first.sop_instance_uid
    assert entry.zone_binary == [1, 1, 1, 1, 0, 0]
    assert float(block[0x05].value) == pytest.approx(Worklist(db).entries()[0].priority.priority, abs=0.1)
    item = next(workitems(Worklist(db), "CXRTRIAGE"))  # and UPS ranks it by the same band
    assert item.ScheduledProcedureStepPriority == "HIGH" and "(high)" in item.ProcedureStepLabel


def test_a_missing_lung_makes_its_image_the_worst_everywhere(db: Database, studies: Studies, tmp_path: Path) -> None:
    """zones_scored (the results column the score stage fills): a film with the left lung
    not found (2 of 3 zones affected) outranks one with 4 of 6."""
    study = uid()
    studies.image(study, result=(4, 8, 0.9))
    one_lung = studies.image(study, result=(2, 4, 0.7), missing=("left",))
    entry = Worklist(db).entries(now=T0)[0]
    assert entry.worst_sop_instance_uid == one_lung.sop_instance_uid
    assert entry.priority.band == "critical" and "one lung found" in entry.priority.flags
    assert entry.zones_scored == 3 and entry.missing_lungs == ["left"] and entry.zone_binary[3:] == [None] * 3
    comments = next(engine(db, tmp_path).find(severity_query(study), "STUDY")).StudyComments
    assert "zone score 2/6" in comments and "P(disease) 0.70" in comments and "worklist critical" in comments

    off = Worklist(db, PrioritySettings(missing_lung_zones_affected=False)).entries(now=T0)[0]
    assert off.total_score == 4 and off.priority.band == "high"  # configurable, as before


def test_no_lung_found_is_never_ranked_as_a_clear_film(db: Database, studies: Studies) -> None:
    """zones_scored 0 (neither lung found): six unscored zones rank as affected, flagged."""
    study = uid()
    studies.image(study, result=(0, 0, 0.1), missing=("right", "left"))
    entry = Worklist(db).entries(now=T0)[0]
    assert entry.priority.band == "critical" and "no lung found" in entry.priority.flags
    assert entry.zones_scored == 0


def test_ai_status_and_research_use_in_cfind(db: Database, studies: Studies, tmp_path: Path) -> None:
    pending, failed, refused, scored = uid(), uid(), uid(), uid()
    studies.image(pending)
    studies.image(pending, result="failed")
    studies.image(failed, result="failed")
    studies.image(refused, result="not_scorable")
    studies.image(scored, result=(1, 2, 0.3))
    qe = engine(db, tmp_path)
    comment = {s: next(qe.find(severity_query(s), "STUDY")).StudyComments for s in (pending, failed, refused, scored)}
    assert comment[pending] == "cxrtriage PENDING, worklist unscored"
    assert comment[failed] == "cxrtriage FAILED, worklist ai_failed"
    assert comment[refused] == "cxrtriage NOT_SCORABLE, worklist ai_failed"
    assert comment[scored].endswith("RESEARCH USE: models not trained on real radiographs")


def test_study_cfind_ranks_only_the_matched_studies(db: Database, studies: Studies, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = uid()
    for study in (wanted, uid(), uid()):
        studies.image(study, result=(3, 6, 0.8))
    calls: list[Any] = []
    original = Worklist.entries

    def spy(self: Worklist, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("studies"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Worklist, "entries", spy)
    qe = engine(db, tmp_path)
    next(qe.find(severity_query(wanted), "STUDY"))
    assert calls == [{wanted}]
    list(qe.find(identifier(StudyInstanceUID=wanted), "STUDY"))  # severity not asked for: not computed
    assert calls == [{wanted}]


# -- C-FIND matching in SQL (PS3.4 C.2.2.2) -------------------------------


def test_wildcards_are_star_and_question_mark_only(db: Database, studies: Studies, tmp_path: Path) -> None:
    """C.2.2.2.4: `[` `]` are literal (fnmatch made them a character class); so are SQL's `%` and `_`."""
    ids = {"bracket": "AB[1]", "plain": "AB1", "percent": "A%C", "under": "A_C", "abc": "ABC", "lower": "abc"}
    by_id = {}
    for name, patient_id in ids.items():
        by_id[name] = uid()
        studies.image(by_id[name], patient_id=patient_id)
    qe = engine(db, tmp_path)

    def studies_of(pattern: str) -> set[str]:
        return {name for name, s in by_id.items() if s in found(qe, PatientID=pattern)}

    assert studies_of("AB[1]") == {"bracket"}
    assert studies_of("AB[1]*") == {"bracket"}
    assert studies_of("AB?") == {"plain", "abc"}  # `?` is exactly one character; LO is case-sensitive
    assert studies_of("A%C") == {"percent"}
    assert studies_of("A_C") == {"under"}
    assert studies_of("A?C") == {"percent", "under", "abc"}
    assert studies_of("a*") == {"lower"}
    assert studies_of("ABC") == {"abc"}
    assert studies_of("*") == set(by_id)  # universal
    assert studies_of("") == set(by_id)


def test_person_names_match_case_insensitively(db: Database, studies: Studies, tmp_path: Path) -> None:
    doe, other = uid(), uid()
    studies.image(doe, patient_name="Doe^John")
    studies.image(other, patient_name="Roe^Jane")
    qe = engine(db, tmp_path)
    assert found(qe, PatientName="DOE^JOHN") == [doe]
    assert found(qe, PatientName="doe*") == [doe]
    assert found(qe, PatientName="?oe^J*") == sorted([doe, other])
    assert found(qe, PatientName="Doe") == []


def test_ranges_uid_lists_numbers_and_levels(db: Database, studies: Studies, tmp_path: Path) -> None:
    a, b, c = uid(), uid(), uid()
    studies.image(a, study_date="20260101", study_time="081500", series_number=1)
    studies.image(b, study_date="20260615", study_time="120000", series_number=2)
    studies.image(c, study_date="20261231", study_time="235959", series_number=12)
    qe = engine(db, tmp_path)
    assert found(qe, StudyDate="20260101-20260615") == sorted([a, b])
    assert found(qe, StudyDate="20260601-") == sorted([b, c])
    assert found(qe, StudyDate="-20260101") == [a]
    assert found(qe, StudyTime="-1200") == sorted([a, b])  # -B compares at B's precision
    assert found(qe, StudyDate="20260615") == [b]
    assert found(qe, StudyInstanceUID=f"{a}\\{c}") == sorted([a, c])
    assert found(qe, StudyInstanceUID=[a, b]) == sorted([a, b])
    series = {str(r.SeriesInstanceUID) for r in qe.find(identifier("SERIES", SeriesInstanceUID="", SeriesNumber="12"), "STUDY")}
    assert series == {c + ".1"}
    assert found(qe, SeriesNumber="12") == sorted([a, b, c])  # a SERIES key is not matched at STUDY level
    assert found(qe, "PATIENT", "PATIENT", PatientID="") == [""]


def test_python_matching_for_ups_has_the_same_rules() -> None:
    assert matches("AB[1]", "AB[1]", "LO") and not matches("AB[1]", "AB1", "LO")
    assert matches("A?C", "A%C", "LO") and not matches("a*", "ABC", "LO")
    assert matches("doe*", "Doe^John", "PN") and matches("*", None, "LO")
    assert matches("20260101-", "20260615", "DA") and not matches("-20260101", "20260615", "DA")
    assert matches("1.2\\1.3", "1.3", "UI") and not matches("1.2", "1.20", "UI")


def test_computed_study_keys_from_one_query(db: Database, studies: Studies, tmp_path: Path) -> None:
    study = uid()
    studies.image(study, result=(1, 2, 0.5))
    studies.image(study, kind="seg", sop_class=SEG, modality="SEG", series=study + ".2")
    response = next(engine(db, tmp_path).find(identifier(StudyInstanceUID=study, ModalitiesInStudy="",
                                                         NumberOfStudyRelatedInstances="",
                                                         NumberOfStudyRelatedSeries="", SOPClassesInStudy=""), "STUDY"))
    assert list(response.ModalitiesInStudy) == ["CR", "SEG"]
    assert (int(response.NumberOfStudyRelatedInstances), int(response.NumberOfStudyRelatedSeries)) == (2, 2)
    assert sorted(response.SOPClassesInStudy) == sorted([CR, SEG])


# -- the worklist query ---------------------------------------------------


def test_worklist_reads_only_what_it_shows(db: Database, studies: Studies) -> None:
    critical, high, low, read, claimed = (uid() for _ in range(5))
    studies.image(critical, result=(6, 18, 0.99))
    studies.image(high, result=(3, 6, 0.9))
    studies.image(low, result=(0, 0, 0.1))
    studies.image(read, result=(6, 18, 0.99))
    studies.image(claimed, result=(1, 2, 0.6))
    studies.state(read, "read")
    studies.state(claimed, "claimed")
    worklist = Worklist(db)
    assert [e.study_instance_uid for e in worklist.entries(now=T0)] == [critical, high, claimed, low]
    assert read in [e.study_instance_uid for e in worklist.entries(now=T0, include_read=True)]
    assert claimed not in [e.study_instance_uid for e in worklist.entries(now=T0, unread_only=True)]
    assert [e.study_instance_uid for e in worklist.entries(now=T0, limit=2)] == [critical, high]
    assert [e.study_instance_uid for e in worklist.entries(now=T0, band="high")] == [high]
    assert [e.study_instance_uid for e in worklist.entries(now=T0, studies=[low, high])] == [high, low]
    lean = worklist.entries(now=T0, details=False)[0]  # ranking without any JSON parse
    assert lean.total_score == 6 and lean.zones_scored == 6 and lean.zone_brixia == [] and not lean.research_use


def test_study_not_found_is_its_own_error(db: Database, studies: Studies) -> None:
    worklist = Worklist(db)
    for action in (worklist.study, lambda u: worklist.claim(u, "dr_a"), lambda u: worklist.mark_read(u, "dr_a")):
        with pytest.raises(StudyNotFound):
            action("1.2.3.999")
    assert not issubclass(StudyNotFound, KeyError)


def test_api_is_typed_and_only_missing_studies_are_404(db: Database, studies: Studies, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from cxrtriage.triage.web import create_app

    study = uid()
    studies.image(study, result=(4, 8, 0.6))
    studies.image(study, result=(2, 4, 0.99))
    worklist = Worklist(db)
    client = TestClient(create_app(worklist, Archive(tmp_path)), base_url="http://127.0.0.1",
                        raise_server_exceptions=False)
    rows = client.get("/api/worklist?limit=1").json()
    assert len(rows) == 1 and (rows[0]["total_score"], rows[0]["p_disease"]) == (4, 0.6)
    assert rows[0]["research_use"] and rows[0]["research_use_notice"] and rows[0]["models"]
    detail = client.get(f"/api/studies/{study}").json()
    assert detail["image_results"][0]["scores"]["model_identity"]["lungs"]["name"] == "bundled-lungs"
    assert detail["image_results"][0]["scores"]["zones"]["left_upper"]["brixia_zone"] == "D"
    assert client.get("/api/studies/1.2.3.999").status_code == 404
    assert client.post("/api/studies/1.2.3.999/claim", json={"reader": "dr_a"}).status_code == 404
    assert client.get("/studies/1.2.3.999").status_code == 404

    schema = client.get("/openapi.json").json()
    ok = schema["paths"]["/api/studies/{uid}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/StudyDetail"}
    assert {"WorklistRow", "StudyDetail", "ImageResult"} <= set(schema["components"]["schemas"])

    def broken(uid: str) -> None:
        raise KeyError("a bug, not a missing study")

    monkeypatch.setattr(worklist, "study", broken)
    assert client.get(f"/api/studies/{study}").status_code == 500


# -- C-GET sends the stored bytes ------------------------------------------


def test_cget_sends_the_stored_encoding_unchanged(db: Database, studies: Studies, tmp_path: Path) -> None:
    from pynetdicom import AE, build_role, evt
    from pynetdicom.dsutils import split_dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

    from cxrtriage.inference.phantom import PhantomGenerator, write_cr

    from .harness import free_port

    source = write_cr(PhantomGenerator(448, 416)(4_700_000), tmp_path / "cr.dcm")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    archive = Archive(tmp_path / "archive")
    relative = archive.relative_path(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID, ".dcm")
    archive.path(relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, archive.path(relative))
    syntax = str(header.file_meta.TransferSyntaxUID)
    studies.image(str(header.StudyInstanceUID), sop_instance_uid=str(header.SOPInstanceUID), path=relative,
                  series=str(header.SeriesInstanceUID), transfer_syntax=syntax, sop_class=str(header.SOPClassUID))

    scp = AE(ae_title="CXRTRIAGE")
    scp.add_supported_context(GET)
    scp.add_supported_context(str(header.SOPClassUID), [syntax], scu_role=True, scp_role=True)
    handlers = make_handlers(QueryEngine(db, archive, "CXRTRIAGE", Worklist(db)), lambda name: None)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, handlers["get"])])
    received: list[bytes] = []

    def on_store(event: Any) -> int:
        received.append(event.request.DataSet.getvalue())
        return 0x0000

    try:
        scu = AE(ae_title="VIEWER")
        scu.add_requested_context(GET)
        scu.add_requested_context(str(header.SOPClassUID), syntax)
        assoc = scu.associate("127.0.0.1", port, ae_title="CXRTRIAGE", ext_neg=[build_role(str(header.SOPClassUID), scp_role=True)],
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        statuses = [s.Status for s, _ in assoc.send_c_get(identifier(StudyInstanceUID=header.StudyInstanceUID), GET) if s]
        assoc.release()
    finally:
        server.shutdown()
    assert statuses[-1] == 0x0000 and len(received) == 1
    _, offset = split_dataset(archive.path(relative))
    assert received[0] == archive.path(relative).read_bytes()[offset:]  # byte for byte what was stored
