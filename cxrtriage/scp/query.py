"""Query/Retrieve SCP over what the node holds (PS3.4 Annex C).

C-FIND, C-MOVE and C-GET in the Patient Root and Study Root information
models, at PATIENT, STUDY, SERIES and IMAGE level. Matching follows PS3.4
C.2.2.2 and is done by the database (one SELECT with a WHERE per key):
universal (empty, or only ``*``), single value, wild card (``*``, ``?`` and
nothing else; case-insensitive for person names), list of UIDs, and ranges for
dates and times (``A-B``, ``A-``, ``-B``).

Study-level responses carry the AI severity, as requested keys only. It is the
study's most severe image (:func:`cxrtriage.triage.priority.worst_image`, the
one rule the worklist, the REST API and UPS use too): all values come from that
one image, never the maximum of each field over several.

* Study Comments (0032,4000), when requested: a one-line summary such as
  ``cxrtriage SCORED: zone score 3/6, Brixia-style 8/18, P(disease) 0.97``.
  The element is retired but every PACS dictionary knows it, so it passes
  through systems that drop unknown private elements (Orthanc does).
* a private block (creator ``CXRTRIAGE``, group 0x0099), when the query
  names any element of group 0x0099:

=========== == =====================================================
(0099,1001) IS 0-6 zone score of the most severe image
(0099,1002) IS its Brixia-style total (0-18)
(0099,1003) DS its P(disease)
(0099,1004) CS AI status: SCORED, PENDING, FAILED or NOT_SCORABLE
(0099,1005) DS reading priority (higher first; see cxrtriage.triage.priority)
(0099,1006) CS worklist band: CRITICAL, HIGH, MODERATE, LOW, UNSCORED, AI_FAILED
=========== == =====================================================

C-MOVE and C-GET retrieve by the unique keys only (PS3.4 C.4.2.2.1, C.4.3.2):
the unique key of the Query/Retrieve Level and of every level above it in the
model (Patient ID for the Patient Root model; then Study, Series and SOP
Instance UID), each a single value without wild cards; the key of the
retrieve level may be a list of UIDs. An identifier without them is refused
with 0xA900 "Identifier does not match SOP Class" (PS3.4 C.4.2.1.4, C.4.3.1.4)
and an Error Comment naming the key, never with the whole archive. Other keys
in a retrieve identifier are ignored.

The reading worklist is also offered as a UPS Pull worklist (C-FIND on
Unified Procedure Step - Pull, PS3.4 CC.2.5): one workitem per unread
study, in reading order, with Scheduled Procedure Step Priority (0074,1200)
HIGH for critical and high studies, LOW for low ones, MEDIUM otherwise.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import ColumnElement, Integer, String, cast, func, select

from ..dicom_header import derived_uid
from ..observability import event
from ..storage.archive import Archive
from ..storage.db import Database
from ..storage.models import Instance
from ..triage.worklist import Worklist, WorklistEntry, chunks

log = logging.getLogger(__name__)

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
LEVEL_KEY = {
    "PATIENT": "patient_id", "STUDY": "study_instance_uid", "SERIES": "series_instance_uid", "IMAGE": "sop_instance_uid"
}
RANGE_VRS = {"DA", "TM", "DT"}
IGNORED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "TimezoneOffsetFromUTC"}
#: Study-level keys computed over all of a study's instances.
STUDY_COMPUTED = (
    "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries", "SOPClassesInStudy"
)
#: LIKE's escape character; the query's own ``%``, ``_`` and ``\`` are matched literally.
LIKE_ESCAPE = "\\"
#: The unique key of each level (PS3.4 C.6.1.1 and C.6.2.1: Patient Root and Study Root key tables).
UNIQUE_KEYS = {
    "PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"
}
#: "Identifier does not match SOP Class": the failure for an identifier C-FIND, C-MOVE or C-GET cannot use
#: (PS3.4 C.4.1.1.4, C.4.2.1.4, C.4.3.1.4).
IDENTIFIER_DOES_NOT_MATCH = 0xA900
#: Error Comment (0000,0902) is LO: 64 characters at most (PS3.7 Annex C).
ERROR_COMMENT_MAX = 64


class QueryError(ValueError):
    """An identifier the node cannot answer; its message (no dataset values) becomes the Error Comment."""


def failure_status(exc: QueryError, status: int = IDENTIFIER_DOES_NOT_MATCH) -> Dataset:
    """A failure status with the reason as Error Comment, as pynetdicom sends a Dataset status."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = str(exc)[:ERROR_COMMENT_MAX]
    return ds


def unique_keys(level: str, model: str) -> list[str]:
    """The unique keys a C-MOVE / C-GET at ``level`` needs: its own and those of the levels above it in ``model``."""
    top = LEVELS.index("PATIENT" if model == "PATIENT" else "STUDY")
    return [UNIQUE_KEYS[lvl] for lvl in LEVELS[top: LEVELS.index(level) + 1]]


def check_unique_keys(identifier: Dataset, level: str, model: str) -> None:
    """Refuse a retrieve identifier without a usable value for every unique key (PS3.4 C.4.2.2.1).

    Single value matching above the retrieve level; at it, a list of UIDs (or one value).
    Empty values, universal matching and wild cards (``*``, ``?``) are refused.
    """
    for keyword in unique_keys(level, model):
        if keyword not in identifier:
            raise QueryError(f"{keyword} missing: a {level} retrieve needs it")
        value = identifier[keyword].value
        values = uid_list(value) if keyword != "PatientID" else [str(value or "").strip()]
        if not values or any(not v for v in values):
            raise QueryError(f"{keyword} is empty: a {level} retrieve needs it")
        if any(has_wildcard(v) for v in values):
            raise QueryError(f"{keyword} has a wild card: retrieve needs values")
        if len(values) > 1 and keyword != UNIQUE_KEYS[level]:
            raise QueryError(f"{keyword} must be a single value above {level} level")


def _column(keyword: str) -> str | None:
    for attributes in LEVEL_ATTRIBUTES.values():
        if keyword in attributes:
            return attributes[keyword]
    return None


# -- matching (PS3.4 C.2.2.2) ---------------------------------------------


def is_universal(query: Any) -> bool:
    """Universal matching (C.2.2.2.3): an empty value, or a wild card value of only ``*`` (C.2.2.2.4)."""
    if query is None or (isinstance(query, (list, tuple, MultiValue)) and not query):
        return True
    text = str(query)
    return text == "" or set(text) == {"*"}


def uid_list(query: Any) -> list[str]:
    """List of UID matching (C.2.2.2.2): the UIDs of a multi-valued or backslash-separated value."""
    values = list(query) if isinstance(query, (list, tuple, MultiValue)) else str(query).split("\\")
    return [str(v).strip() for v in values if str(v).strip()]


def has_wildcard(text: str) -> bool:
    """C.2.2.2.4: ``*`` and ``?`` are the only wild cards (``[``, ``]`` and the rest are literal)."""
    return "*" in text or "?" in text


def like_pattern(text: str) -> str:
    """A C-FIND wild card value as a LIKE pattern: ``*`` -> ``%``, ``?`` -> ``_``.

    Literal ``%`` ``_`` ``\\`` are escaped.
    """
    out = []
    for char in text:
        if char in ("%", "_", LIKE_ESCAPE):
            out.append(LIKE_ESCAPE + char)
        else:
            out.append({"*": "%", "?": "_"}.get(char, char))
    return "".join(out)


def glob_pattern(text: str) -> str:
    """A C-FIND wild card value as an SQLite GLOB pattern (case-sensitive): only ``[`` needs escaping."""
    return text.replace("[", "[[]")


def _as_text(column: Any) -> ColumnElement[str]:
    """Integer columns (Series / Instance Number) compare as their decimal text, NULL as empty."""
    if isinstance(column.type, Integer):
        return func.coalesce(cast(column, String), "")
    return column


def _range(column: ColumnElement[str], text: str) -> ColumnElement[bool]:
    """Range matching (C.2.2.2.5): ``A-B``, ``A-`` and ``-B``, inclusive; ``-B`` compares B's precision."""
    low, high = text.split("-", 1)
    conditions = []
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(func.substr(column, 1, len(high)) <= high)
    if len(conditions) == 2:
        return conditions[0] & conditions[1]
    return conditions[0] if conditions else column == column


def _wildcard(column: ColumnElement[str], text: str, ignore_case: bool, dialect: str) -> ColumnElement[bool]:
    """Wild card matching (C.2.2.2.4), case-sensitive except for person names.

    SQLite's LIKE ignores ASCII case, so the case-sensitive match there is a GLOB;
    PostgreSQL's LIKE is case-sensitive and its ILIKE is not.
    """
    if ignore_case:
        return column.ilike(like_pattern(text), escape=LIKE_ESCAPE)
    if dialect == "sqlite":
        return column.op("GLOB")(glob_pattern(text))
    return column.like(like_pattern(text), escape=LIKE_ESCAPE)


def match_condition(column: Any, query: Any, vr: str, dialect: str) -> ColumnElement[bool] | None:
    """The SQL condition of one matching key (PS3.4 C.2.2.2); None for universal matching.

    Person names (PN) match case-insensitively, which C.2.2.2.1 allows ("insensitive to
    some or all aspects of case"): ASCII case on SQLite, the server's rules on PostgreSQL.
    """
    if is_universal(query):
        return None
    if vr == "UI":
        return column.in_(uid_list(query))
    text = str(query)
    target = _as_text(column)
    if vr in RANGE_VRS and "-" in text:
        return _range(target, text)
    if has_wildcard(text) or vr == "PN":
        return _wildcard(target, text, vr == "PN", dialect)
    return target == text


def _wildcard_regex(text: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text), re.DOTALL)


def matches(query: Any, actual: Any, vr: str) -> bool:
    """One attribute's matching rule (PS3.4 C.2.2.2) in Python, for the UPS workitems (not in the database)."""
    if is_universal(query):
        return True
    actual_text = "" if actual is None else str(actual)
    if vr == "UI":
        return actual_text in uid_list(query)
    text = str(query)
    if vr in RANGE_VRS and "-" in text:
        low, high = text.split("-", 1)
        return (not low or actual_text >= low) and (not high or actual_text[: len(high)] <= high)
    if vr == "PN":
        actual_text, text = actual_text.upper(), text.upper()
    if has_wildcard(text):
        return _wildcard_regex(text).fullmatch(actual_text) is not None
    return actual_text == text


# -- severity -------------------------------------------------------------


@dataclass
class StudySeverity:
    """A study's severity as C-FIND reports it: the values of its one most severe image."""

    total: int | None
    brixia: int | None
    p_disease: float | None
    status: str
    priority: float | None = None
    band: str | None = None
    research_use: bool = False

    @classmethod
    def of(cls, entry: WorklistEntry) -> StudySeverity:
        """From the study's worklist entry: the same image the worklist shows (priority.worst_image)."""
        return cls(entry.total_score, entry.brixia_total, entry.p_disease, entry.ai_status,
                   entry.priority.priority, entry.priority.band, entry.research_use)


def study_severities(worklist: Worklist, study_uids: Iterable[str]) -> dict[str, StudySeverity]:
    """Per study (read ones included): the severity of its most severe image, or its AI status."""
    uids = set(study_uids)
    if not uids:
        return {}
    return {e.study_instance_uid: StudySeverity.of(e) for e in worklist.entries(include_read=True, studies=uids)}


def severity_summary(severity: StudySeverity) -> str:
    band = f", worklist {severity.band}" if severity.band else ""
    if severity.total is None:
        return f"cxrtriage {severity.status}{band}"
    notice = ", RESEARCH USE: models not trained on real radiographs" if severity.research_use else ""
    return (f"cxrtriage {severity.status}: zone score {severity.total}/6, Brixia-style {severity.brixia}/18, "
            f"P(disease) {severity.p_disease or 0.0:.2f}{band}{notice}")


def add_severity(identifier: Dataset, severity: StudySeverity) -> None:
    block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    if severity.total is not None:
        block.add_new(0x01, "IS", severity.total)
        block.add_new(0x02, "IS", severity.brixia)
        block.add_new(0x03, "DS", f"{severity.p_disease or 0.0:.4f}")
    block.add_new(0x04, "CS", severity.status)
    if severity.priority is not None:
        block.add_new(0x05, "DS", f"{severity.priority:.2f}")
        block.add_new(0x06, "CS", (severity.band or "").upper())


def wants_severity(identifier: Dataset) -> bool:
    """Severity is returned only when asked for: Study Comments, or any element of the private group."""
    return "StudyComments" in identifier or any(element.tag.group == PRIVATE_GROUP for element in identifier)


# -- the engine -----------------------------------------------------------


class QueryEngine:
    """Matches identifiers against the instance table (in SQL) and builds responses."""

    def __init__(self, db: Database, archive: Archive, ae_title: str, worklist: Worklist | None = None) -> None:
        self.db = db
        self.archive = archive
        self.ae_title = ae_title
        self.worklist = worklist if worklist is not None else Worklist(db)

    def _level(self, identifier: Dataset, model: str) -> str:
        level = str(identifier.get("QueryRetrieveLevel", "")).upper()
        if level not in LEVELS:
            raise QueryError(f"Query/Retrieve Level {level or '(none)'} is not one of {LEVELS}")
        if model == "STUDY" and level == "PATIENT":
            raise QueryError("PATIENT level is not part of the Study Root model")
        return level

    def conditions(self, identifier: Dataset, level: str) -> list[ColumnElement[bool]]:
        """One SQL condition per matching key at or above ``level`` (keys of lower levels are not matched)."""
        allowed = {k for lvl in LEVELS[: LEVELS.index(level) + 1] for k in LEVEL_ATTRIBUTES[lvl]}
        dialect = self.db.engine.dialect.name
        out = []
        for element in identifier:
            keyword = element.keyword
            if keyword in IGNORED or keyword not in allowed or element.VR == "SQ":
                continue
            column = _column(keyword)
            condition = (
                match_condition(getattr(Instance, column), element.value, element.VR, dialect) if column else None
            )
            if condition is not None:
                out.append(condition)
        return out

    def matching_instances(self, identifier: Dataset, model: str) -> tuple[str, list[Instance]]:
        level = self._level(identifier, model)
        query = (select(Instance).where(Instance.duplicate_of_id.is_(None), *self.conditions(identifier, level))
                 .order_by(Instance.id))
        with self.db.session() as session:
            return level, list(session.scalars(query).all())

    def find(self, identifier: Dataset, model: str) -> Iterator[Dataset]:
        level, rows = self.matching_instances(identifier, model)
        groups: dict[str, list[Instance]] = {}
        for row in rows:
            groups.setdefault(str(getattr(row, LEVEL_KEY[level])), []).append(row)
        study_uids = {g[0].study_instance_uid for g in groups.values()}
        severities = (study_severities(self.worklist, study_uids)
                      if level == "STUDY" and wants_severity(identifier) else {})
        studies = (self._studies(study_uids)
                   if any(keyword in identifier for keyword in STUDY_COMPUTED) else {})
        for members in groups.values():
            yield self._response(identifier, level, members, studies, severities.get(members[0].study_instance_uid))

    def _response(self, identifier: Dataset, level: str, members: list[Instance],
                  studies: dict[str, list[tuple[str, str, str]]], severity: StudySeverity | None) -> Dataset:
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
            else:
                setattr(response, keyword, element.value if element.VR == "SQ" else "")
        if "SpecificCharacterSet" in identifier:
            response.SpecificCharacterSet = "ISO_IR 192"
        response.RetrieveAETitle = self.ae_title
        if severity is not None:
            if "StudyComments" in identifier:
                response.StudyComments = severity_summary(severity)
            if any(element.tag.group == PRIVATE_GROUP for element in identifier):
                for element in [e for e in response if e.tag.group == PRIVATE_GROUP]:
                    del response[element.tag]
                add_severity(response, severity)
        return response

    def _value(self, keyword: str, first: Instance, members: list[Instance],
               studies: dict[str, list[tuple[str, str, str]]]) -> Any:
        column = _column(keyword)
        if column:
            value = getattr(first, column)
            return "" if value is None else value
        if keyword == "NumberOfSeriesRelatedInstances":
            return len(members)
        if keyword == "NumberOfPatientRelatedStudies":
            return len({m.study_instance_uid for m in members})
        if keyword not in STUDY_COMPUTED:
            return None
        study = studies.get(first.study_instance_uid, [])
        if keyword == "ModalitiesInStudy":
            return sorted({modality for modality, _, _ in study if modality})
        if keyword == "NumberOfStudyRelatedInstances":
            return len(study)
        if keyword == "NumberOfStudyRelatedSeries":
            return len({series for _, series, _ in study})
        return sorted({sop_class for _, _, sop_class in study})

    def _studies(self, uids: Iterable[str]) -> dict[str, list[tuple[str, str, str]]]:
        """(modality, series UID, SOP class) of every instance of these studies, in one query per 500 studies."""
        wanted = sorted(set(uids))
        out: dict[str, list[tuple[str, str, str]]] = {}
        with self.db.session() as session:
            for chunk in chunks(wanted):
                for uid, modality, series, sop_class in session.execute(
                    select(Instance.study_instance_uid, Instance.modality, Instance.series_instance_uid,
                           Instance.sop_class_uid)
                    .where(Instance.study_instance_uid.in_(chunk), Instance.duplicate_of_id.is_(None))
                ):
                    out.setdefault(uid, []).append((modality, series, sop_class))
        return out

    def retrieve(self, identifier: Dataset, model: str) -> Retrieval:
        """Instances to send for a C-MOVE / C-GET identifier: matched on its unique keys only.

        Raises :class:`QueryError` when a unique key is missing, empty or a wild card.
        """
        level = self._level(identifier, model)
        check_unique_keys(identifier, level, model)
        keys = Dataset()
        keys.QueryRetrieveLevel = level
        for keyword in unique_keys(level, model):
            keys[keyword] = identifier[keyword]
        _, rows = self.matching_instances(keys, model)
        return Retrieval(rows, self.archive)


@dataclass
class Retrieval:
    rows: Sequence[Instance]
    archive: Archive

    def __len__(self) -> int:
        return len(self.rows)

    def contexts(self) -> list[Any]:
        """One presentation context per stored (SOP class, transfer syntax): no transcoding needed."""
        from pynetdicom import build_context

        pairs = sorted({(r.sop_class_uid, r.transfer_syntax_uid) for r in self.rows})
        return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs][:128]

    def datasets(self) -> Iterator[Dataset]:
        """Each stored instance as read from the archive, its elements left encoded.

        pynetdicom 3.0's C-GET / C-MOVE service classes take only a Dataset from the
        handler (a file path counts as a failed sub-operation), so the file is read
        but nothing in it is converted: pydicom keeps every element raw, and since the
        presentation context is the stored transfer syntax (:meth:`contexts`),
        ``write_dataset`` copies the raw bytes back out unchanged. Pixel data is
        never decoded and the stored encoding is what the peer receives.
        """
        for row in self.rows:
            yield pydicom.dcmread(self.archive.path(row.path))


UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
VERIFICATION = "1.2.840.10008.1.1"
UPS_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.1"
UPS_PRIORITY = {"critical": "HIGH", "high": "HIGH", "low": "LOW"}
#: Requested Procedure Priority (0040,1003) values that make the workitem HIGH whatever the AI found.
URGENT_ORDERS = frozenset({"STAT", "HIGH"})


def ups_priority(band: str, requested_priority: str, dimse_high: bool) -> str:
    """Scheduled Procedure Step Priority (0074,1200; PS3.3 C.30.2.1): HIGH, MEDIUM or LOW.

    The band's mapping, raised to HIGH for an urgent order (STAT or HIGH requested
    priority, or a C-STORE sent with DIMSE priority HIGH): as on the worklist, the
    AI never lowers the order's priority (triage/priority.py).
    """
    if requested_priority.strip().upper() in URGENT_ORDERS or dimse_high:
        return "HIGH"
    return UPS_PRIORITY.get(band, "MEDIUM")
UPS_STATE = {"unread": "SCHEDULED", "claimed": "IN PROGRESS", "read": "COMPLETED"}


def workitems(worklist: Worklist, ae_title: str) -> Iterator[Dataset]:
    """One UPS workitem per unread or claimed study, in reading order (PS3.4 CC.2.5)."""
    for entry in worklist.entries(details=False):  # the workitem needs no zone grades or model names
        item = Dataset()
        item.SOPClassUID = UPS_SOP_CLASS
        item.SOPInstanceUID = derived_uid(entry.study_instance_uid, "reading", "ups")
        item.ProcedureStepState = UPS_STATE[entry.reading_state]
        item.ScheduledProcedureStepPriority = ups_priority(entry.priority.band, entry.requested_priority,
                                                           entry.dimse_high)
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


def make_handlers(
    engine: QueryEngine, move_lookup: Callable[[str], tuple[str, int, dict] | None]
) -> dict[str, Callable]:
    """pynetdicom handlers for C-FIND (Q/R and UPS Pull), C-MOVE and C-GET bound to ``engine``."""

    def handle_find(evt: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        if str(evt.context.abstract_syntax) == UPS_PULL:
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
            yield failure_status(exc), None

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
            # pynetdicom sends a final status only after one sub-operation is announced, and it
            # associates with the destination first: that association carries nothing.
            from pynetdicom import build_context

            yield host, port, {**kwargs, "contexts": [build_context(VERIFICATION)]}
            yield 1
            yield failure_status(exc), None
            return
        yield host, port, {**kwargs, "contexts": retrieval.contexts()}
        yield from sub_operations(retrieval, evt)

    def handle_get(evt: Any) -> Iterator[Any]:
        try:
            retrieval = engine.retrieve(evt.identifier, model_of(evt))
        except QueryError as exc:
            event(log, logging.WARNING, "C-GET refused", reason=str(exc))
            yield 1  # pynetdicom answers 0 sub-operations with Success; the failure must follow one announced
            yield failure_status(exc), None
            return
        yield from sub_operations(retrieval, evt)

    return {"find": handle_find, "move": handle_move, "get": handle_get}
