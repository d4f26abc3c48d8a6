"""From a DICOM header to an :class:`~.models.Instance` row."""

from __future__ import annotations

from typing import Any

import pydicom

from .models import Instance


def text(ds: pydicom.Dataset, keyword: str, limit: int = 64) -> str:
    value = ds.get(keyword)
    return str(value).strip()[:limit] if value is not None else ""


def integer(ds: pydicom.Dataset, keyword: str) -> int | None:
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


def instance_row(ds: pydicom.Dataset, **fields: Any) -> Instance:
    """An Instance with the header's patient/study/series/instance attributes plus ``fields``.

    ``fields`` must give at least path, sha256, size and kind.
    """
    return Instance(
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
        **fields,
    )
