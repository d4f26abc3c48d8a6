"""Reading and making DICOM headers: the helpers ingest, scoring and the stages share.

* UIDs derived from a source instance (the PS3.5 9.1 grammar check has one
  definition, ``storage.archive.check_uid``, where a UID becomes a path);
* reads: text and integers from a dataset, Requested Procedure Priority,
  the catalog attributes of a header, an element cut short by truncation;
* :class:`EncodedObject`: a SEG or SR as the bytes it will be stored and
  sent as, with the header facts the node needs about it, so nobody parses
  the bytes back to learn what the builder already knew.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import pydicom

__all__ = [
    "EncodedObject", "catalog_attributes", "derived_uid", "integer", "requested_priority", "text", "truncated_element",
]


#: Namespace of the name-based UUIDs behind derived UIDs (PS3.5 B.2: "2.25." + UUID as integer).
_UID_NAMESPACE = uuid.UUID("6f0c5a0e-2f3b-5a51-9a4e-6378727472ca")


def derived_uid(source_uid: str, algorithm_version: str, what: str) -> str:
    """A UID fixed by (source instance, algorithm version, object kind).

    A UUIDv5 of those three, written in the 2.25 form; pydicom's
    ``generate_uid(prefix=None)`` would ignore its entropy and be random.
    """
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, f"{source_uid}|{algorithm_version}|{what}").int)


def text(ds: pydicom.Dataset, keyword: str, limit: int = 64) -> str:
    """The element's value as stripped text, cut to ``limit`` characters; "" when absent."""
    value = ds.get(keyword)
    return str(value).strip()[:limit] if value is not None else ""


def integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    """The element's value as an integer; None when absent, empty or not a number."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def requested_priority(ds: pydicom.Dataset) -> str:
    """Requested Procedure Priority (0040,1003), top level or in the Request Attributes Sequence."""
    value = text(ds, "RequestedProcedurePriority", 16)
    if not value:
        for item in ds.get("RequestAttributesSequence", []) or []:
            value = text(item, "RequestedProcedurePriority", 16)
            if value:
                break
    return value.upper()


def truncated_element(ds: Any) -> str | None:
    """The keyword of an element cut short by the end of the file, or None.

    pydicom reads a truncated value without complaint; right after parsing,
    the last raw element still carries the length it declared, so the cut
    shows as a value shorter than that length.
    """
    elements = getattr(ds, "_dict", {})
    if not elements:
        return None
    tag = max(elements)
    last = elements[tag]
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    if isinstance(value, (bytes, bytearray)) and length not in (None, 0xFFFFFFFF) and len(value) < length:
        from pydicom.datadict import keyword_for_tag

        return keyword_for_tag(tag) or str(tag)
    return None


def catalog_attributes(ds: pydicom.Dataset) -> dict[str, Any]:
    """The header's patient / study / series / instance attributes, as catalog columns (``storage.models.Instance``)."""
    return dict(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        patient_id=text(ds, "PatientID"),
        patient_name=text(ds, "PatientName", 324),
        patient_birth_date=text(ds, "PatientBirthDate", 8),
        patient_sex=text(ds, "PatientSex", 16),
        study_date=text(ds, "StudyDate", 8),
        study_time=text(ds, "StudyTime", 16),
        study_id=text(ds, "StudyID", 16),
        accession_number=text(ds, "AccessionNumber", 16),
        study_description=text(ds, "StudyDescription"),
        referring_physician=text(ds, "ReferringPhysicianName", 324),
        modality=text(ds, "Modality", 16),
        series_number=integer(ds, "SeriesNumber"),
        series_description=text(ds, "SeriesDescription"),
        instance_number=integer(ds, "InstanceNumber"),
        body_part=text(ds, "BodyPartExamined", 16),
        view_position=text(ds, "ViewPosition", 16),
        requested_priority=requested_priority(ds),
    )


ResultKind = Literal["seg", "sr"]


@dataclass(frozen=True)
class EncodedObject:
    """A result object as stored and sent: its DICOM file bytes and what the node needs to know about it.

    Plain values only: it crosses the scoring pool's process boundary.
    The series-level facts fill the catalog row; patient and study
    attributes come from the source's row (the builder copied them).
    """

    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    body_part: str
    data: bytes

    @classmethod
    def encode(cls, ds: pydicom.Dataset, kind: ResultKind) -> EncodedObject:
        """Encode ``ds`` in the DICOM file format (preamble, File Meta, its transfer syntax) and keep its facts."""
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return cls(
            kind=kind,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=text(ds, "Modality", 16),
            series_number=integer(ds, "SeriesNumber"),
            series_description=text(ds, "SeriesDescription"),
            instance_number=integer(ds, "InstanceNumber"),
            body_part=text(ds, "BodyPartExamined", 16),
            data=buffer.getvalue(),
        )
