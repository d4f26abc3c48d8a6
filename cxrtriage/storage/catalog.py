"""Catalog rows (:class:`~.models.Instance`) from facts, never from a parsed dataset.

Reading a header is :mod:`cxrtriage.dicom_header`'s job (storage imports
nothing else of the project); here a received image's row is built from the
attributes read off its header, and a SEG's or SR's row from what its
builder knew plus its source's row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .models import Instance

#: Patient and study attributes a derived object shares with its source (the builder copies them).
PATIENT_STUDY_COLUMNS = (
    "patient_id", "patient_name", "patient_birth_date", "patient_sex", "study_date", "study_time", "study_id",
    "accession_number", "study_description", "referring_physician",
)


class DerivedObject(Protocol):
    """What the catalog needs to know about a SEG or SR the node wrote (``dicom_header.EncodedObject``).

    Read-only members: a frozen dataclass satisfies it.
    """

    @property
    def kind(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def series_instance_uid(self) -> str: ...
    @property
    def study_instance_uid(self) -> str: ...
    @property
    def transfer_syntax_uid(self) -> str: ...
    @property
    def modality(self) -> str: ...
    @property
    def series_number(self) -> int | None: ...
    @property
    def series_description(self) -> str: ...
    @property
    def instance_number(self) -> int | None: ...
    @property
    def body_part(self) -> str: ...


def instance_row(attributes: Mapping[str, Any], **fields: Any) -> Instance:
    """A received instance's row: its header's catalog attributes plus ``fields`` (path, sha256, size, kind, ...)."""
    return Instance(**attributes, **fields)


def derived_row(
    obj: DerivedObject, source: Instance, *, path: str, sha256: str, size: int, calling_aet: str
) -> Instance:
    """The row of a SEG or SR derived from ``source``: its own UIDs and series, the source's patient and study."""
    return Instance(
        sop_instance_uid=obj.sop_instance_uid,
        sop_class_uid=obj.sop_class_uid,
        transfer_syntax_uid=obj.transfer_syntax_uid,
        study_instance_uid=obj.study_instance_uid,
        series_instance_uid=obj.series_instance_uid,
        modality=obj.modality,
        series_number=obj.series_number,
        series_description=obj.series_description,
        instance_number=obj.instance_number,
        body_part=obj.body_part,
        **{column: getattr(source, column) for column in PATIENT_STUDY_COLUMNS},
        path=path, sha256=sha256, size=size, kind=obj.kind, derived_from_id=source.id, calling_aet=calling_aet,
    )
