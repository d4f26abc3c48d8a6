"""Query/Retrieve SCP over what the node holds (PS3.4 Annex C).

C-FIND, C-MOVE and C-GET in the Patient Root and Study Root information
models, at PATIENT, STUDY, SERIES and IMAGE level. Matching follows PS3.4
C.2.2.2: universal (empty), single value, wildcard (``*``, ``?``; case-
insensitive for person names), list of UIDs, and ranges for dates and
times (``A-B``, ``A-``, ``-B``).

Study-level responses carry the AI severity, as requested keys only:

* Study Comments (0032,4000), when requested: a one-line summary such as
  ``cxrtriage SCORED: zone score 3/6, Brixia-style 8/18, P(disease) 0.97``.
  The element is retired but every PACS dictionary knows it, so it passes
  through systems that drop unknown private elements (Orthanc does).
* a private block (creator ``CXRTRIAGE``, group 0x0099), when the query
  names any element of group 0x0099:

=========== == =====================================================
(0099,1001) IS highest 0-6 zone score among the study's images
(0099,1002) IS highest Brixia-style total (0-18)
(0099,1003) DS highest P(disease)
(0099,1004) CS AI status: SCORED, PENDING, FAILED or NOT_SCORABLE
(0099,1005) DS reading priority (higher first; see cxrtriage.triage.priority)
(0099,1006) CS worklist band: CRITICAL, HIGH, MODERATE, LOW, UNSCORED, AI_FAILED
=========== == =====================================================

The reading worklist is also offered as a UPS Pull worklist (C-FIND on
Unified Procedure Step - Pull, PS3.4 CC.2.5): one workitem per unread
study, in reading order, with Scheduled Procedure Step Priority (0074,1200)
HIGH for critical and high studies, LOW for low ones, MEDIUM otherwise.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from ..inference.result_model import ImageResult
from ..observability import event
from ..storage.archive import Archive
from ..storage.db import Database
from ..storage.models import Instance, ScoreResult

log = logging.getLogger("cxrtriage.scp.query")

PRIVATE_GROUP = 0x0099
PRIVATE_CREATOR = "CXRTRIAGE"

#: DICOM keyword -> Instance column, by the level that owns the attribute.
LEVEL_ATTRIBUTES: dict[str, dict[str, str]] = {
    "PATIENT": {
        "PatientID": "patient_id",
        "PatientName": "patient_name",
        "PatientBirthDate": "patient_birth_date",
        "PatientSex": "patient_sex",
    },
    "STUDY": {
        "StudyInstanceUID": "study_instance_uid",
        "StudyDate": "study_date",
        "StudyTime": "study_time",
        "AccessionNumber": "accession_number",
        "StudyID": "study_id",
        "StudyDescription": "study_description",
        "ReferringPhysicianName": "referring_physician",
    },
    "SERIES": {
        "SeriesInstanceUID": "series_instance_uid",
        "Modality": "modality",
        "SeriesNumber": "series_number",
        "SeriesDescription": "series_description",
    },
    "IMAGE": {
        "SOPInstanceUID": "sop_instance_uid",
        "SOPClassUID": "sop_class_uid",
        "InstanceNumber": "instance_number",
    },
}
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
LEVEL_KEY = {"PATIENT": "patient_id", "STUDY": "study_instance_uid", "SERIES": "series_instance_uid", "IMAGE": "sop_instance_uid"}
RANGE_VRS = {"DA", "TM", "DT"}
IGNORED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "TimezoneOffsetFromUTC"}


class QueryError(ValueError):
    pass


def _column(keyword: str) -> str | None:
    for attributes in LEVEL_ATTRIBUTES.values():
        if keyword in attributes:
            return attributes[keyword]
    return None


def matches(query: Any, actual: Any, vr: str) -> bool:
    """One attribute's matching rule (PS3.4 C.2.2.2)."""
    if query is None or query == "" or (isinstance(query, (list, tuple)) and not query):
        return True
    actual_text = "" if actual is None else str(actual)
    if vr == "UI":
        wanted = list(query) if isinstance(query, (list, tuple, pydicom.multival.MultiValue)) else str(query).split("\\")
        return actual_text in {w.strip() for w in wanted}
    text = str(query)
    if vr in RANGE_VRS and "-" in text:
        low, high = text.split("-", 1)
        return (not low or actual_text >= low) and (not high or actual_text[: len(high)] <= high)
    if "*" in text or "?" in text:
        if vr == "PN":
            return fnmatch.fnmatchcase(actual_text.upper(), text.upper())
        return fnmatch.fnmatchcase(actual_text, text)
    if vr == "PN":
        return actual_text.upper() == text.upper()
    return actual_text == text


@dataclass
class StudySeverity:
    total: int | None
    brixia: int | None
    p_disease: float | None
    status: str
    priority: float | None = None
    band: str | None = None
    research_use: bool = False


def study_severities(db: Database, study_uids: Iterable[str]) -> dict[str, StudySeverity]:
    """Per study: the most severe scored image, or the status when none is scored."""
    uids = list(set(study_uids))
    out: dict[str, StudySeverity] = {}
    if not uids:
        return out
    with db.session() as session:
        results = session.scalars(select(ScoreResult).where(ScoreResult.study_instance_uid.in_(uids))).all()
        sources = session.execute(
            select(Instance.study_instance_uid, Instance.id).where(
                Instance.study_instance_uid.in_(uids), Instance.kind == "source", Instance.duplicate_of_id.is_(None)
            )
        ).all()
    by_study: dict[str, list[ScoreResult]] = {}
    for r in results:
        by_study.setdefault(r.study_instance_uid, []).append(r)
    pending = {uid for uid, instance_id in sources if instance_id not in {r.instance_id for r in results}}
    for uid in uids:
        scored = [r for r in by_study.get(uid, []) if r.status == "scored"]
        if scored:
            out[uid] = StudySeverity(
                max(r.total_score or 0 for r in scored), max(r.brixia_total or 0 for r in scored),
                max(r.p_disease or 0.0 for r in scored), "SCORED",
                # results from before identities were recorded came from the synthetic-only bundle
                research_use=any(ImageResult.model_validate_json(r.details or "{}").research_use for r in scored),
            )
        elif uid in pending:
            out[uid] = StudySeverity(None, None, None, "PENDING")
        elif by_study.get(uid):
            status = "FAILED" if any(r.status == "failed" for r in by_study[uid]) else "NOT_SCORABLE"
            out[uid] = StudySeverity(None, None, None, status)
    return out


def severity_summary(severity: StudySeverity) -> str:
    band = f", worklist {severity.band}" if severity.band else ""
    if severity.total is None:
        return f"cxrtriage {severity.status}{band}"
    notice = ", RESEARCH USE: models not trained on real radiographs" if severity.research_use else ""
    return (f"cxrtriage {severity.status}: zone score {severity.total}/6, Brixia-style {severity.brixia}/18, "
            f"P(disease) {severity.p_disease:.2f}{band}{notice}")


def add_severity(identifier: Dataset, severity: StudySeverity) -> None:
    block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    if severity.total is not None:
        block.add_new(0x01, "IS", severity.total)
        block.add_new(0x02, "IS", severity.brixia)
        block.add_new(0x03, "DS", f"{severity.p_disease:.4f}")
    block.add_new(0x04, "CS", severity.status)
    if severity.priority is not None:
        block.add_new(0x05, "DS", f"{severity.priority:.2f}")
        block.add_new(0x06, "CS", (severity.band or "").upper())


class QueryEngine:
    """Matches identifiers against the instance table and builds responses."""

    def __init__(self, db: Database, archive: Archive, ae_title: str, worklist: Any = None) -> None:
        self.db = db
        self.archive = archive
        self.ae_title = ae_title
        self.worklist = worklist

    def _level(self, identifier: Dataset, model: str) -> str:
        level = str(identifier.get("QueryRetrieveLevel", "")).upper()
        if level not in LEVELS:
            raise QueryError(f"Query/Retrieve Level {level or '(none)'} is not one of {LEVELS}")
        if model == "STUDY" and level == "PATIENT":
            raise QueryError("PATIENT level is not part of the Study Root model")
        return level

    def matching_instances(self, identifier: Dataset, model: str) -> tuple[str, list[Instance]]:
        level = self._level(identifier, model)
        allowed = {k for lvl in LEVELS[: LEVELS.index(level) + 1] for k in LEVEL_ATTRIBUTES[lvl]}
        with self.db.session() as session:
            query = select(Instance).where(Instance.duplicate_of_id.is_(None))
            uid = identifier.get("StudyInstanceUID")
            if uid and isinstance(uid, str) and "\\" not in uid and "*" not in uid:
                query = query.where(Instance.study_instance_uid == uid)  # the common, indexed case
            rows = session.scalars(query).all()
        selected = []
        for row in rows:
            ok = True
            for element in identifier:
                keyword = element.keyword
                if keyword in IGNORED or keyword not in allowed:
                    continue
                column = _column(keyword)
                if column and not matches(element.value, getattr(row, column), element.VR):
                    ok = False
                    break
            if ok:
                selected.append(row)
        return level, selected

    def find(self, identifier: Dataset, model: str) -> Iterator[Dataset]:
        level, rows = self.matching_instances(identifier, model)
        groups: dict[str, list[Instance]] = {}
        for row in rows:
            groups.setdefault(str(getattr(row, LEVEL_KEY[level])), []).append(row)
        severities = study_severities(self.db, (g[0].study_instance_uid for g in groups.values())) if level == "STUDY" else {}
        if severities and self.worklist is not None:
            for entry in self.worklist.entries(include_read=True):
                if entry.study_instance_uid in severities:
                    severities[entry.study_instance_uid].priority = entry.priority.priority
                    severities[entry.study_instance_uid].band = entry.priority.band
        studies: dict[str, list[Instance]] = {}  # each study's instances, read once per C-FIND
        for members in groups.values():
            first = members[0]
            response = Dataset()
            response.QueryRetrieveLevel = level
            for element in identifier:
                keyword = element.keyword
                if not keyword or keyword in IGNORED:
                    continue
                value = self._value(keyword, first, members, studies)
                if value is not None:
                    setattr(response, keyword, value)
                elif keyword:
                    setattr(response, keyword, element.value if element.VR == "SQ" else "")
            if "SpecificCharacterSet" in identifier:
                response.SpecificCharacterSet = "ISO_IR 192"
            response.RetrieveAETitle = self.ae_title
            severity = severities.get(first.study_instance_uid)
            if severity is not None:
                if "StudyComments" in identifier:
                    response.StudyComments = severity_summary(severity)
                if any(element.tag.group == PRIVATE_GROUP for element in identifier):
                    for element in [e for e in response if e.tag.group == PRIVATE_GROUP]:
                        del response[element.tag]
                    add_severity(response, severity)
            yield response

    def _value(self, keyword: str, first: Instance, members: list[Instance], studies: dict[str, list[Instance]]) -> Any:
        column = _column(keyword)
        if column:
            value = getattr(first, column)
            return "" if value is None else value
        if keyword == "NumberOfSeriesRelatedInstances":
            return len(members)
        if keyword == "NumberOfPatientRelatedStudies":
            return len({m.study_instance_uid for m in members})
        if keyword not in ("ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
                           "SOPClassesInStudy"):
            return None
        if first.study_instance_uid not in studies:
            studies[first.study_instance_uid] = self._study(first)
        study = studies[first.study_instance_uid]
        if keyword == "ModalitiesInStudy":
            return sorted({m.modality for m in study if m.modality})
        if keyword == "NumberOfStudyRelatedInstances":
            return len(study)
        if keyword == "NumberOfStudyRelatedSeries":
            return len({m.series_instance_uid for m in study})
        return sorted({m.sop_class_uid for m in study})

    def _study(self, first: Instance) -> list[Instance]:
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Instance).where(
                        Instance.study_instance_uid == first.study_instance_uid, Instance.duplicate_of_id.is_(None)
                    )
                ).all()
            )

    def retrieve(self, identifier: Dataset, model: str) -> "Retrieval":
        """Instances to send for a C-MOVE / C-GET identifier."""
        _, rows = self.matching_instances(identifier, model)
        return Retrieval(rows, self.archive)


@dataclass
class Retrieval:
    rows: list[Instance]
    archive: Archive

    def __len__(self) -> int:
        return len(self.rows)

    def contexts(self) -> list[Any]:
        """One presentation context per stored (SOP class, transfer syntax): no transcoding needed."""
        from pynetdicom import build_context

        pairs = sorted({(r.sop_class_uid, r.transfer_syntax_uid) for r in self.rows})
        return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs][:128]

    def datasets(self) -> Iterator[Dataset]:
        for row in self.rows:
            yield pydicom.dcmread(self.archive.path(row.path))


UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.1"
UPS_PRIORITY = {"critical": "HIGH", "high": "HIGH", "low": "LOW"}
UPS_STATE = {"unread": "SCHEDULED", "claimed": "IN PROGRESS", "read": "COMPLETED"}


def workitems(worklist: Any, ae_title: str) -> Iterator[Dataset]:
    """One UPS workitem per unread or claimed study, in reading order (PS3.4 CC.2.5)."""
    from ..inference.dicom_results import derived_uid

    for entry in worklist.entries():
        item = Dataset()
        item.SOPClassUID = UPS_SOP_CLASS
        item.SOPInstanceUID = derived_uid(entry.study_instance_uid, "reading", "ups")
        item.ProcedureStepState = UPS_STATE[entry.reading_state]
        item.ScheduledProcedureStepPriority = UPS_PRIORITY.get(entry.priority.band, "MEDIUM")
        item.ProcedureStepLabel = f"Read chest X-ray ({entry.priority.band.replace('_', ' ')})"
        item.WorklistLabel = f"{ae_title} reading"
        item.ScheduledProcedureStepStartDateTime = entry.received_at.strftime("%Y%m%d%H%M%S")
        item.InputReadinessState = "READY"
        item.PatientID = entry.patient_id
        item.StudyInstanceUID = entry.study_instance_uid
        item.AccessionNumber = entry.accession_number
        item.CommentsOnTheScheduledProcedureStep = (
            f"priority {entry.priority.priority:.1f}; flags: {', '.join(entry.priority.flags) or 'none'}"
        )
        yield item


def ups_matches(identifier: Dataset, item: Dataset) -> Dataset | None:
    """Filter a workitem by the identifier's keys and keep only the requested ones."""
    response = Dataset()
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in IGNORED:
            continue
        value = item.get(keyword)
        if element.VR != "SQ" and not matches(element.value, value, element.VR):
            return None
        setattr(response, keyword, value if value is not None else (element.value if element.VR == "SQ" else ""))
    response.SOPClassUID = UPS_SOP_CLASS
    response.SOPInstanceUID = item.SOPInstanceUID
    return response


def model_of(evt: Any) -> str:
    """PATIENT or STUDY root, from the context's abstract syntax 1.2.840.10008.5.1.4.1.2.<root>.<op>."""
    return "STUDY" if str(evt.context.abstract_syntax).split(".")[9] == "2" else "PATIENT"


def make_handlers(engine: QueryEngine, move_lookup: Callable[[str], tuple[str, int, dict] | None]) -> dict[str, Callable]:
    """pynetdicom handlers for C-FIND (Q/R and UPS Pull), C-MOVE and C-GET bound to ``engine``."""

    def handle_find(evt: Any) -> Iterator[tuple[int, Dataset | None]]:
        if str(evt.context.abstract_syntax) == UPS_PULL:
            if engine.worklist is None:
                yield 0xC000, None
                return
            for item in workitems(engine.worklist, engine.ae_title):
                response = ups_matches(evt.identifier, item)
                if response is not None:
                    yield 0xFF00, response
            return
        try:
            model = model_of(evt)
            for response in engine.find(evt.identifier, model):
                if evt.is_cancelled:
                    yield 0xFE00, None
                    return
                yield 0xFF00, response
        except QueryError as exc:
            event(log, logging.WARNING, "C-FIND refused", reason=str(exc))
            yield 0xA900, None

    def sub_operations(retrieval: Retrieval, evt: Any) -> Iterator[Any]:
        yield len(retrieval)
        for ds in retrieval.datasets():
            if evt.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds

    def handle_move(evt: Any) -> Iterator[Any]:
        destination = evt.move_destination
        name = (destination.decode() if isinstance(destination, bytes) else str(destination)).strip()
        target = move_lookup(name)
        if target is None:
            event(log, logging.WARNING, "C-MOVE to unknown destination", destination=name)
            yield None, None
            return
        host, port, kwargs = target
        try:
            retrieval = engine.retrieve(evt.identifier, model_of(evt))
        except QueryError as exc:
            event(log, logging.WARNING, "C-MOVE refused", reason=str(exc))
            yield host, port
            yield 0
            return
        yield host, port, {**kwargs, "contexts": retrieval.contexts()}
        yield from sub_operations(retrieval, evt)

    def handle_get(evt: Any) -> Iterator[Any]:
        try:
            retrieval = engine.retrieve(evt.identifier, model_of(evt))
        except QueryError as exc:
            event(log, logging.WARNING, "C-GET refused", reason=str(exc))
            yield 0
            return
        yield from sub_operations(retrieval, evt)

    return {"find": handle_find, "move": handle_move, "get": handle_get}
